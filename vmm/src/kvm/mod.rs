//! The KVM backend (`/dev/kvm`, via `kvm-ioctls`).

mod kick;
mod state;
mod vcpu;
mod vm;

use std::sync::Arc;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::{Cap, Kvm};

pub use state::{KvmVcpuState, KvmVmState};

use crate::hypervisor::{Hypervisor, HypervisorError, Vm};

/// Capabilities the VMM relies on; probed once when the backend opens.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::Xcrs, "KVM_CAP_XCRS"),
    (Cap::Xsave, "KVM_CAP_XSAVE"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
];

/// Host facts shared by every VM of this backend.
#[derive(Debug)]
pub(crate) struct HostCaps {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs that can be read and written back on this host, in a fixed order.
    pub msrs: Vec<u32>,
    pub tsc_khz: Option<u64>,
}

/// KVM on this host.
#[derive(Debug)]
pub struct KvmHypervisor {
    kvm: Kvm,
    caps: Arc<HostCaps>,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm` and probes what the VMM needs.
    pub fn open() -> Result<Self, HypervisorError> {
        let kvm = Kvm::new().map_err(|e| HypervisorError::Open(e.into()))?;
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(HypervisorError::MissingCapability(name));
            }
        }
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| ioctl("KVM_GET_SUPPORTED_CPUID", e))?
            .as_slice()
            .to_vec();
        advertise_avx(&mut cpuid);
        // MSR probing and the TSC frequency need a vCPU; a throwaway VM provides one.
        let probe_vm = kvm.create_vm().map_err(|e| ioctl("KVM_CREATE_VM", e))?;
        probe_vm
            .create_irq_chip()
            .map_err(|e| ioctl("KVM_CREATE_IRQCHIP", e))?;
        let probe_vcpu = probe_vm
            .create_vcpu(0)
            .map_err(|e| ioctl("KVM_CREATE_VCPU", e))?;
        let msrs = state::probe_msrs(&kvm, &probe_vcpu)?;
        let tsc_khz = probe_vcpu.get_tsc_khz().ok().map(u64::from);
        Ok(Self {
            kvm,
            caps: Arc::new(HostCaps {
                cpuid,
                msrs,
                tsc_khz,
            }),
        })
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create_vm(&self) -> Result<Box<dyn Vm>, HypervisorError> {
        Ok(Box::new(vm::KvmVm::new(&self.kvm, self.caps.clone())?))
    }

    fn tsc_khz(&self) -> Option<u64> {
        self.caps.tsc_khz
    }
}

/// CPUID.1:ECX bits for XSAVE and AVX.
const CPUID_1_ECX_XSAVE: u32 = 1 << 26;
const CPUID_1_ECX_AVX: u32 = 1 << 28;
/// XCR0 bit of the AVX (YMM) state component.
const XCR0_AVX: u32 = 1 << 2;

/// PVM's supported CPUID leaves out XSAVE and AVX although its leaf 0xD
/// lists the AVX state and AVX code runs natively at CPL3 (PLATFORM.md).
/// Advertise both when the host CPU has them and KVM manages the AVX state,
/// so that guests can see AVX and the VMM can enable it through XCR0.
fn advertise_avx(cpuid: &mut [kvm_cpuid_entry2]) {
    let avx_state = cpuid
        .iter()
        .any(|e| e.function == 0xd && e.index == 0 && e.eax & XCR0_AVX != 0);
    let host =
        std::arch::is_x86_feature_detected!("xsave") && std::arch::is_x86_feature_detected!("avx");
    if avx_state && host {
        for leaf in cpuid.iter_mut().filter(|e| e.function == 1) {
            leaf.ecx |= CPUID_1_ECX_XSAVE | CPUID_1_ECX_AVX;
        }
    }
}

pub(crate) fn ioctl(op: &'static str, err: kvm_ioctls::Error) -> HypervisorError {
    HypervisorError::Ioctl {
        op,
        source: err.into(),
    }
}
