// SPDX-License-Identifier: MIT OR Apache-2.0
//! A `BPF_F_MMAPABLE` array map mapped into the agent's memory, so its
//! values are written with plain stores instead of a syscall each. Unmapped
//! on drop.

use std::os::fd::{AsRawFd as _, BorrowedFd};

pub struct Mapped {
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the mapping is owned by this value and only written through `&mut`.
unsafe impl Send for Mapped {}
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Maps the first `bytes` of the array map `fd` (an array stores each
    /// value rounded up to 8 bytes); `None` if the map is not mappable (e.g.
    /// pinned by an older agent without the flag).
    pub fn map(fd: BorrowedFd<'_>, bytes: usize) -> Option<Self> {
        // SAFETY: a shared mapping of a BPF array map; the kernel checks
        // that it is mmapable and `bytes` fits.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        (ptr != libc::MAP_FAILED).then_some(Self { ptr: ptr.cast(), bytes })
    }

    /// Stores `v` at byte offset `off` (aligned for `T`); false out of bounds.
    pub fn store<T: Copy>(&mut self, off: usize, v: T) -> bool {
        if off + size_of::<T>() > self.bytes || off % align_of::<T>() != 0 {
            return false;
        }
        // SAFETY: in bounds and aligned (checked above; the mapping is
        // page-aligned) in our live mapping.
        unsafe { self.ptr.add(off).cast::<T>().write_volatile(v) };
        true
    }

    /// Loads the `T` at byte offset `off`, `None` out of bounds.
    pub fn load<T: Copy>(&self, off: usize) -> Option<T> {
        if off + size_of::<T>() > self.bytes || off % align_of::<T>() != 0 {
            return None;
        }
        // SAFETY: as in `store`.
        Some(unsafe { self.ptr.add(off).cast::<T>().read_volatile() })
    }

    /// A pointer to the `T` at byte offset `off` (aligned for `T`), for
    /// shared-memory protocols that need atomics on it (the conntrack
    /// table's words); `None` out of bounds.
    pub fn ptr_at<T>(&self, off: usize) -> Option<*mut T> {
        if off + size_of::<T>() > self.bytes || !off.is_multiple_of(align_of::<T>()) {
            return None;
        }
        // SAFETY: in bounds of our live mapping (checked above).
        Some(unsafe { self.ptr.add(off).cast::<T>() })
    }

    /// Makes the stores so far visible before whatever map write follows.
    pub fn publish(&self) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}
