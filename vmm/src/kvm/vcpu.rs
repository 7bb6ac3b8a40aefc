use std::sync::Arc;

use kvm_bindings::{Msrs, kvm_dtable, kvm_msr_entry, kvm_segment};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd, VmFd};

use super::kick::{KickState, install_handler};
use super::state::{regs_from_kvm, regs_to_kvm, restore_vcpu, save_vcpu};
use super::{HostCaps, ioctl};
use crate::hypervisor::{
    ControlRegs, HypervisorError, LongModeEntry, Regs, StateError, UserSelectors, Vcpu, VcpuExit,
    VcpuKicker, VcpuState,
};

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;

/// CPUID.1:ECX bit for XSAVE support.
const CPUID_1_ECX_XSAVE: u32 = 1 << 26;
/// XCR0 bits the guest may use: x87, SSE, AVX.
const XCR0_GUEST_MASK: u64 = 0b111;

#[derive(Debug)]
pub(crate) struct KvmVcpu {
    fd: VcpuFd,
    caps: Arc<HostCaps>,
    kick: Arc<KickState>,
}

impl KvmVcpu {
    pub(crate) fn new(vm: &VmFd, id: u8, caps: Arc<HostCaps>) -> Result<Self, HypervisorError> {
        install_handler();
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| ioctl("KVM_CREATE_VCPU", e))?;
        let cpuid = kvm_bindings::CpuId::from_entries(&caps.cpuid)
            .map_err(|_| HypervisorError::MissingCapability("a CPUID table KVM accepts"))?;
        fd.set_cpuid2(&cpuid)
            .map_err(|e| ioctl("KVM_SET_CPUID2", e))?;
        Ok(Self {
            fd,
            caps,
            kick: Arc::new(KickState::default()),
        })
    }

    /// XCR0 the guest gets: what it asks for, limited to what CPUID leaf 0xD
    /// says the host supports (x87 is mandatory).
    fn supported_xcr0(&self, requested: u64) -> Option<u64> {
        let leaf1 = self.caps.cpuid.iter().find(|e| e.function == 1)?;
        if leaf1.ecx & CPUID_1_ECX_XSAVE == 0 {
            return None;
        }
        let leaf_d = self
            .caps
            .cpuid
            .iter()
            .find(|e| e.function == 0xd && e.index == 0)?;
        let supported = (u64::from(leaf_d.edx) << 32) | u64::from(leaf_d.eax);
        Some((requested & supported & XCR0_GUEST_MASK) | 1)
    }
}

impl KvmVcpu {
    /// Completes a pending I/O exit (KVM finishes the instruction on the
    /// next entry) without running guest code: immediate_exit makes KVM_RUN
    /// return EINTR right after the completion.
    fn complete_pending_io(&mut self) -> Result<(), kvm_ioctls::Error> {
        self.fd.set_kvm_immediate_exit(1);
        let completed = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Err(kvm_ioctls::Error::new(libc::EPROTO)),
        };
        self.fd.set_kvm_immediate_exit(0);
        completed
    }
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        // Execute/read accessed code, or read/write accessed data.
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: 0,
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VcpuExit, HypervisorError> {
        if self.kick.take_pending() {
            return Ok(VcpuExit::Interrupted);
        }
        let immediate_exit: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        // SAFETY: `immediate_exit` points into this vCPU's kvm_run mapping,
        // owned by `self.fd`, which outlives the guard (dropped at the end of
        // this function, on this thread).
        let guard = unsafe { self.kick.enter_run(immediate_exit) };
        if self.kick.take_pending() {
            return Ok(VcpuExit::Interrupted);
        }
        let exit = match self.fd.run() {
            Ok(KvmExit::IoOut(port, data)) => {
                let mut raw = [0u8; 4];
                let size = data.len().min(4);
                raw[..size].copy_from_slice(&data[..size]);
                VcpuExit::IoOut {
                    port,
                    size: size as u8,
                    data: u32::from_le_bytes(raw),
                }
            }
            Ok(KvmExit::IoIn(port, data)) => VcpuExit::IoIn {
                port,
                size: data.len() as u8,
            },
            Ok(KvmExit::MmioRead(addr, _)) => VcpuExit::Mmio { addr, write: false },
            Ok(KvmExit::MmioWrite(addr, _)) => VcpuExit::Mmio { addr, write: true },
            Ok(KvmExit::Hlt) => VcpuExit::Halt,
            Ok(KvmExit::Shutdown) => VcpuExit::Shutdown,
            Ok(KvmExit::InternalError) => VcpuExit::InternalError {
                reason: "KVM_EXIT_INTERNAL_ERROR".into(),
            },
            Ok(KvmExit::FailEntry(reason, cpu)) => VcpuExit::InternalError {
                reason: format!("entry failed: hardware reason {reason:#x} on cpu {cpu}"),
            },
            Ok(KvmExit::Intr) => VcpuExit::Interrupted,
            Ok(other) => VcpuExit::Unexpected {
                reason: format!("{other:?}"),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                VcpuExit::Interrupted
            }
            Err(e) => return Err(ioctl("KVM_RUN", e)),
        };
        drop(guard);
        if exit == VcpuExit::Interrupted {
            self.fd.set_kvm_immediate_exit(0);
            self.kick.take_pending();
        }
        Ok(exit)
    }

    fn regs(&self) -> Result<Regs, HypervisorError> {
        self.fd
            .get_regs()
            .map(|r| regs_from_kvm(&r))
            .map_err(|e| ioctl("KVM_GET_REGS", e))
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<(), HypervisorError> {
        self.fd
            .set_regs(&regs_to_kvm(regs))
            .map_err(|e| ioctl("KVM_SET_REGS", e))
    }

    fn control_regs(&self) -> Result<ControlRegs, HypervisorError> {
        let s = self.fd.get_sregs().map_err(|e| ioctl("KVM_GET_SREGS", e))?;
        Ok(ControlRegs {
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        })
    }

    fn set_long_mode_entry(&mut self, boot: &LongModeEntry) -> Result<(), HypervisorError> {
        let mut sregs = self.fd.get_sregs().map_err(|e| ioctl("KVM_GET_SREGS", e))?;
        let data = segment(boot.user_data_selector, false);
        sregs.cs = segment(boot.user_code_selector, true);
        sregs.ss = data;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.gdt = kvm_dtable {
            base: boot.gdt_base,
            limit: boot.gdt_limit,
            padding: [0; 3],
        };
        sregs.idt = kvm_dtable {
            base: boot.idt_base,
            limit: boot.idt_limit,
            padding: [0; 3],
        };
        sregs.tr = kvm_segment {
            base: boot.tss_base,
            limit: boot.tss_limit,
            selector: boot.tss_selector,
            // Busy 64-bit TSS.
            type_: 0xb,
            present: 1,
            ..Default::default()
        };
        sregs.cr0 = boot.cr0;
        sregs.cr3 = boot.cr3;
        sregs.cr4 = boot.cr4;
        sregs.efer = boot.efer;
        let xcr0 = self.supported_xcr0(boot.xcr0);
        if xcr0.is_none() {
            // Without XSAVE, CR4.OSXSAVE must stay clear.
            sregs.cr4 &= !(1 << 18);
        }
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| ioctl("KVM_SET_SREGS", e))?;
        // STAR's CS for `syscall` is the kernel's; nothing is masked from RFLAGS.
        let entries = [
            (MSR_STAR, u64::from(0x08u16) << 32),
            (MSR_LSTAR, boot.syscall_entry),
            (MSR_SYSCALL_MASK, 0),
        ]
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        });
        let msrs = Msrs::from_entries(&entries)
            .map_err(|_| HypervisorError::MissingCapability("three MSR entries"))?;
        let written = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| ioctl("KVM_SET_MSRS", e))?;
        if written != entries.len() {
            return Err(HypervisorError::MissingCapability(
                "writable STAR, LSTAR and SYSCALL_MASK MSRs",
            ));
        }
        if let Some(xcr0) = xcr0 {
            let mut xcrs = self.fd.get_xcrs().map_err(|e| ioctl("KVM_GET_XCRS", e))?;
            xcrs.nr_xcrs = 1;
            xcrs.xcrs[0].xcr = 0;
            xcrs.xcrs[0].value = xcr0;
            self.fd
                .set_xcrs(&xcrs)
                .map_err(|e| ioctl("KVM_SET_XCRS", e))?;
        }
        self.set_regs(&boot.regs)
    }

    fn enter_user(&mut self, regs: &Regs, selectors: UserSelectors) -> Result<(), HypervisorError> {
        self.complete_pending_io()
            .map_err(|e| ioctl("KVM_RUN", e))?;
        let mut sregs = self.fd.get_sregs().map_err(|e| ioctl("KVM_GET_SREGS", e))?;
        sregs.cs = segment(selectors.code, true);
        sregs.ss = segment(selectors.data, false);
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| ioctl("KVM_SET_SREGS", e))?;
        self.set_regs(regs)
    }

    fn set_fs_base(&mut self, base: u64) -> Result<(), HypervisorError> {
        let mut sregs = self.fd.get_sregs().map_err(|e| ioctl("KVM_GET_SREGS", e))?;
        sregs.fs.base = base;
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| ioctl("KVM_SET_SREGS", e))
    }

    fn save_state(&mut self) -> Result<VcpuState, StateError> {
        self.complete_pending_io()
            .map_err(|source| StateError::Save {
                what: "pending I/O completion",
                source: source.into(),
            })?;
        save_vcpu(&self.fd, &self.caps.msrs).map(|s| VcpuState::Kvm(Box::new(s)))
    }

    fn restore_state(&mut self, state: &VcpuState) -> Result<(), StateError> {
        let VcpuState::Kvm(state) = state;
        restore_vcpu(&self.fd, state)
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kick.clone()
    }
}
