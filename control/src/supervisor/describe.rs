//! Completing a clone point's descriptor: its data page runs come from
//! walking the frozen image's memfds, so clone paths do it off the parent's
//! vCPU thread, on the launcher or the housekeeper.

use std::sync::Arc;

use snowflock_vmm::background::{Job, housekeeper};
use snowflock_vmm::memory::MemoryImage;

use super::error::DescribeError;
use super::host::HostState;
use crate::descriptor::Descriptor;
use crate::error_chain;

/// What a completed descriptor says about its clone point.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Description {
    /// Encoded size.
    pub(super) bytes: usize,
    /// Pages holding data (the memory the parent had touched).
    pub(super) data_pages: u64,
}

impl Description {
    pub(super) fn of(descriptor: &Descriptor, bytes: usize) -> Self {
        Self {
            bytes,
            data_pages: descriptor.machine.data_pages.pages(),
        }
    }
}

/// A clone point's description, or the thread computing it.
pub(super) enum Described {
    Pending(Job<Description>),
    Done(Description),
}

impl Described {
    pub(super) fn get(self) -> Description {
        match self {
            Self::Pending(job) => job.wait().unwrap_or_default(),
            Self::Done(description) => description,
        }
    }
}

/// Fills in the descriptor's data page runs from the frozen image, encodes
/// it and saves it if the configuration asks to. This walks the image's
/// memfds, so clone paths run it off the parent's vCPU thread. Returns the
/// completed descriptor and its encoded size.
pub(super) fn describe(
    host: &HostState,
    mut descriptor: Descriptor,
    image: &MemoryImage,
) -> Result<(Descriptor, usize), DescribeError> {
    descriptor
        .machine
        .describe_memory(image)
        .map_err(DescribeError::Memory)?;
    let encoded = descriptor.encode().map_err(DescribeError::Encode)?;
    if let Some(dir) = &host.config.descriptor_dir {
        let path = dir.join(format!(
            "vm{}-gen{}.sfdesc",
            descriptor.parent_vm, descriptor.generation
        ));
        if let Err(e) = std::fs::write(&path, &encoded) {
            tracing::warn!(path = %path.display(), "cannot save descriptor: {e}");
        }
    }
    Ok((descriptor, encoded.len()))
}

/// Describes the clone point on the housekeeper; a failure is logged and
/// leaves the description empty.
pub(super) fn describe_in_background(
    host: &Arc<HostState>,
    descriptor: &Descriptor,
    image: &Arc<MemoryImage>,
) -> Job<Description> {
    let (host, descriptor, image) = (host.clone(), descriptor.clone(), image.clone());
    housekeeper().submit(move || match describe(&host, descriptor, &image) {
        Ok((descriptor, bytes)) => Description::of(&descriptor, bytes),
        Err(e) => {
            tracing::warn!("cannot describe the clone point: {}", error_chain(&e));
            Description::default()
        }
    })
}
