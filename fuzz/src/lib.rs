//! Shared by the fuzz targets: an allocator that aborts on any single allocation larger than
//! the input justifies, so "never allocates more than the bytes present justify" is checked on
//! every execution, not only "never panics".

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The current input's length (set by [`start`]).
static INPUT: AtomicUsize = AtomicUsize::new(0);

/// Largest allocation allowed: a fixed slack for the decoders' own small buffers, plus a
/// multiple of the input (a decoder may copy what it read a few times; never more).
pub fn limit() -> usize {
    64 * 1024 + 16 * INPUT.load(Ordering::Relaxed)
}

pub struct Bounded;

unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn check(size: usize) {
    let input = INPUT.load(Ordering::Relaxed);
    // Zero means outside a run (libFuzzer's own setup): not checked.
    if input != 0 && size > limit() {
        // No formatting here (it could allocate): a fixed message and abort.
        let msg = b"fuzz: an allocation larger than the input justifies\n";
        // SAFETY: write(2) of a static buffer to stderr.
        unsafe {
            libc_write(msg);
        }
        std::process::abort();
    }
}

unsafe fn libc_write(msg: &[u8]) {
    extern "C" {
        fn write(fd: i32, buf: *const u8, n: usize) -> isize;
    }
    // SAFETY: a valid buffer and length.
    let _ = unsafe { write(2, msg.as_ptr(), msg.len()) };
}

/// Call first in every execution.
pub fn start(input: &[u8]) {
    INPUT.store(input.len().max(1), Ordering::Relaxed);
}
