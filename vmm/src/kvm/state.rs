//! Saving and restoring KVM vCPU and VM state, in Firecracker's ioctl order.

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs,
    kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::ioctl;
use crate::hypervisor::{HypervisorError, Regs, StateError, VcpuSummary, VmSummary};

/// Largest MSR batch KVM accepts in one `KVM_GET_MSRS`.
const MSR_BATCH: usize = 255;

/// Everything KVM keeps about one vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmVcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The 4 KiB legacy `kvm_xsave` region (kvm_xsave itself is not Clone).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub vcpu_events: kvm_vcpu_events,
}

/// VM-level KVM state: the clock and the in-kernel interrupt controllers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    pub clock: kvm_clock_data,
    pub irqchips: Vec<kvm_irqchip>,
}

impl KvmVcpuState {
    pub(crate) fn summary(&self) -> VcpuSummary {
        let s = &self.sregs;
        VcpuSummary {
            rip: self.regs.rip,
            rsp: self.regs.rsp,
            rflags: self.regs.rflags,
            rax: self.regs.rax,
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            cs_selector: s.cs.selector,
            cpl: s.cs.selector & 3,
            xcr0: self
                .xcrs
                .xcrs
                .iter()
                .take(self.xcrs.nr_xcrs as usize)
                .find(|x| x.xcr == 0)
                .map(|x| x.value),
            mp_state: self.mp_state.mp_state,
            msrs: self.msrs.len(),
            cpuid_entries: self.cpuid.len(),
            pending_exception: self.vcpu_events.exception.pending != 0
                || self.vcpu_events.exception.injected != 0,
        }
    }
}

impl KvmVmState {
    pub(crate) fn summary(&self) -> VmSummary {
        VmSummary {
            clock_ns: self.clock.clock,
            irqchips: self.irqchips.len(),
        }
    }
}

pub(super) fn save_vcpu(fd: &VcpuFd, msr_indices: &[u32]) -> Result<KvmVcpuState, StateError> {
    let save = |what| {
        move |e: kvm_ioctls::Error| StateError::Save {
            what,
            source: e.into(),
        }
    };
    let mp_state = fd.get_mp_state().map_err(save("mp_state"))?;
    let regs = fd.get_regs().map_err(save("regs"))?;
    let sregs = fd.get_sregs().map_err(save("sregs"))?;
    let xsave = fd.get_xsave().map_err(save("xsave"))?.region.to_vec();
    let xcrs = fd.get_xcrs().map_err(save("xcrs"))?;
    let debug_regs = fd.get_debug_regs().map_err(save("debug registers"))?;
    let lapic = fd.get_lapic().map_err(save("lapic"))?;
    let vcpu_events = fd.get_vcpu_events().map_err(save("vcpu events"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(save("cpuid"))?
        .as_slice()
        .to_vec();
    let msrs = read_msrs(fd, msr_indices).map_err(save("msrs"))?;
    Ok(KvmVcpuState {
        cpuid,
        msrs,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        vcpu_events,
    })
}

pub(super) fn restore_vcpu(fd: &VcpuFd, state: &KvmVcpuState) -> Result<(), StateError> {
    let restore = |what| {
        move |e: kvm_ioctls::Error| StateError::Restore {
            what,
            source: e.into(),
        }
    };
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|_| StateError::Inconsistent(format!("{} CPUID entries", state.cpuid.len())))?;
    fd.set_cpuid2(&cpuid).map_err(restore("cpuid"))?;
    for batch in state.msrs.chunks(MSR_BATCH) {
        let msrs = Msrs::from_entries(batch)
            .map_err(|_| StateError::Inconsistent(format!("{} MSRs", batch.len())))?;
        let written = fd.set_msrs(&msrs).map_err(restore("msrs"))?;
        if written != batch.len() {
            return Err(StateError::Inconsistent(format!(
                "KVM accepted {written} of {} MSRs (first refused: {:#x})",
                batch.len(),
                batch[written].index
            )));
        }
    }
    fd.set_sregs(&state.sregs).map_err(restore("sregs"))?;
    fd.set_regs(&state.regs).map_err(restore("regs"))?;
    let mut xsave = kvm_xsave::default();
    if state.xsave.len() != xsave.region.len() {
        return Err(StateError::Inconsistent(format!(
            "xsave region of {} words",
            state.xsave.len()
        )));
    }
    xsave.region.copy_from_slice(&state.xsave);
    // SAFETY: `xsave` is a complete legacy `kvm_xsave` (the 4 KiB region
    // `get_xsave` produced, no extra area); KVM reads exactly that size.
    unsafe { fd.set_xsave(&xsave) }.map_err(restore("xsave"))?;
    fd.set_xcrs(&state.xcrs).map_err(restore("xcrs"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(restore("debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(restore("lapic"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(restore("mp_state"))?;
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(restore("vcpu events"))?;
    Ok(())
}

fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, kvm_ioctls::Error> {
    let mut out = Vec::with_capacity(indices.len());
    for batch in indices.chunks(MSR_BATCH) {
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("batch is within KVM_MAX_MSR_ENTRIES");
        let read = fd.get_msrs(&mut msrs)?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
    }
    Ok(out)
}

/// The MSRs of KVM's index list that this host can read back and write again.
/// Some listed MSRs fail on some hosts (PVM among them); those are dropped here
/// once rather than at every save.
pub(super) fn probe_msrs(kvm: &Kvm, fd: &VcpuFd) -> Result<Vec<u32>, HypervisorError> {
    let listed = kvm
        .get_msr_index_list()
        .map_err(|e| ioctl("KVM_GET_MSR_INDEX_LIST", e))?;
    let mut usable = Vec::new();
    for &index in listed.as_slice() {
        let entry = [kvm_msr_entry {
            index,
            ..Default::default()
        }];
        let mut msrs = Msrs::from_entries(&entry).expect("one entry fits");
        if !matches!(fd.get_msrs(&mut msrs), Ok(1)) {
            continue;
        }
        if matches!(fd.set_msrs(&msrs), Ok(1)) {
            usable.push(index);
        }
    }
    Ok(usable)
}

pub(super) fn regs_from_kvm(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub(super) fn regs_to_kvm(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}
