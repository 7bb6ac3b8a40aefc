use std::sync::Arc;

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_irqchip,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};

use super::state::KvmVmState;
use super::vcpu::KvmVcpu;
use super::{HostCaps, ioctl};
use crate::hypervisor::{HypervisorError, StateError, Vcpu, Vm, VmState};

#[derive(Debug)]
pub(crate) struct KvmVm {
    fd: VmFd,
    caps: Arc<HostCaps>,
}

impl KvmVm {
    pub(crate) fn new(kvm: &Kvm, caps: Arc<HostCaps>) -> Result<Self, HypervisorError> {
        let fd = kvm.create_vm().map_err(|e| ioctl("KVM_CREATE_VM", e))?;
        // The in-kernel irqchip is what gives each vCPU a LAPIC whose state the
        // descriptor carries; flock guests run with interrupts off.
        fd.create_irq_chip()
            .map_err(|e| ioctl("KVM_CREATE_IRQCHIP", e))?;
        Ok(Self { fd, caps })
    }
}

impl Vm for KvmVm {
    unsafe fn map_memory(
        &mut self,
        slot: u32,
        guest_phys: u64,
        host_addr: *mut u8,
        len: u64,
    ) -> Result<(), HypervisorError> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: guest_phys,
            memory_size: len,
            userspace_addr: host_addr as u64,
            flags: 0,
        };
        // SAFETY: the caller guarantees the host range stays mapped and
        // accessible for as long as the slot exists (this fn's contract).
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| ioctl("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn create_vcpu(&mut self, id: u8) -> Result<Box<dyn Vcpu>, HypervisorError> {
        Ok(Box::new(KvmVcpu::new(&self.fd, id, self.caps.clone())?))
    }

    fn save_state(&self) -> Result<VmState, StateError> {
        let save = |what| {
            move |e: kvm_ioctls::Error| StateError::Save {
                what,
                source: e.into(),
            }
        };
        let clock = self.fd.get_clock().map_err(save("clock"))?;
        let mut irqchips = Vec::with_capacity(3);
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd.get_irqchip(&mut chip).map_err(save("irqchip"))?;
            irqchips.push(chip);
        }
        Ok(VmState::Kvm(Box::new(KvmVmState { clock, irqchips })))
    }

    fn restore_state(&mut self, state: &VmState) -> Result<(), StateError> {
        let VmState::Kvm(state) = state;
        let restore = |what| {
            move |e: kvm_ioctls::Error| StateError::Restore {
                what,
                source: e.into(),
            }
        };
        for chip in &state.irqchips {
            self.fd.set_irqchip(chip).map_err(restore("irqchip"))?;
        }
        let mut clock = state.clock;
        // Only the clock value is settable; the flags describe how it was read.
        clock.flags = 0;
        self.fd.set_clock(&clock).map_err(restore("clock"))?;
        Ok(())
    }
}
