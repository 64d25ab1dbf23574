//! The global allocator of weir's binaries: mimalloc, asked for a plain
//! block wherever a plain block is aligned enough.
//!
//! The `mimalloc` crate hands every request to `mi_malloc_aligned`. In
//! mimalloc 3 that is fast only while the size class's page has a free
//! block at hand and the block happens to be aligned; otherwise, unless the
//! size class is a power of two, it over-allocates (size plus alignment,
//! from a larger size class) on a slower path. In weir's decode, counted
//! with callgrind, 118,528 of 200,685 allocations took that path, for a
//! request alignment of 8 that every mimalloc block already has (the same
//! finding as purpleprotocol/mimalloc_rust#170, not yet released).
//!
//! Every mimalloc block is aligned to 8 bytes, and blocks of a size class
//! that is a multiple of 16 to 16 (pages start 16-aligned, and a request
//! that is a multiple of 16 gets such a class). So a request whose
//! alignment is at most 16 and divides its size is served by the plain
//! functions; any other goes to the aligned ones. A test checks the
//! alignment of every returned block over a range of sizes.
//!
//! mimalloc is built with its `override` feature, so it is also the C
//! heap: `malloc`, `free` and their kin are defined in the executable and
//! exported, and librdkafka (linked in), glibc and OpenSSL allocate from
//! mimalloc too. glibc's allocator had cost the consumer thread about a
//! sixth of its instructions: librdkafka allocates each message's op on
//! its broker thread and the consumer thread frees it (glibc's slow path,
//! a block of another thread's arena), and it allocates and frees each
//! header of each message. A test checks that an allocation made inside
//! glibc lands in mimalloc's heap.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// mimalloc's `MI_MAX_ALIGN_SIZE`: the alignment of its plain blocks whose
/// size is a multiple of it.
const PLAIN_ALIGN: usize = 16;

/// mimalloc, as a global allocator (see the module documentation).
pub struct Mimalloc;

/// Whether a plain block of `size` bytes has alignment `align`.
#[inline]
fn plain(size: usize, align: usize) -> bool {
    align <= PLAIN_ALIGN && size.is_multiple_of(align)
}

// SAFETY: every block comes from mimalloc and goes back to it; a plain
// block is returned only where it has the layout's alignment (see
// `plain`), and any other request goes to mimalloc's aligned functions.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation functions take any size and a
        // power-of-two alignment (a `Layout`'s).
        unsafe {
            if plain(layout.size(), layout.align()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if plain(layout.size(), layout.align()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc, whose
        // `mi_free` takes plain and aligned blocks alike.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from mimalloc; the new block keeps the
        // layout's alignment, plain only where a plain block has it.
        unsafe {
            if plain(new_size, layout.align()) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// C code allocates from mimalloc too: a block `malloc` returns, and
    /// one glibc allocates inside `realpath`, are in mimalloc's heap, and
    /// `free` takes them back.
    #[test]
    fn the_c_heap_is_mimallocs() {
        // SAFETY: malloc of a non-zero size; the block is freed below.
        let block = unsafe { libc::malloc(24) };
        assert!(!block.is_null());
        // SAFETY: a live block.
        assert!(
            unsafe { mi::mi_is_in_heap_region(block) },
            "malloc is mimalloc's"
        );
        // SAFETY: a live block from malloc, freed once.
        unsafe { libc::free(block) };

        // SAFETY: a NUL-terminated path; with a null buffer, realpath
        // allocates the result with glibc's own call to malloc.
        let resolved = unsafe { libc::realpath(c"/".as_ptr(), std::ptr::null_mut()) };
        assert!(!resolved.is_null());
        // SAFETY: realpath returned a NUL-terminated string.
        assert_eq!(unsafe { std::ffi::CStr::from_ptr(resolved) }, c"/");
        // SAFETY: a live block.
        let inside = unsafe { mi::mi_is_in_heap_region(resolved.cast()) };
        // SAFETY: realpath's result is for free, called once.
        unsafe { libc::free(resolved.cast()) };
        assert!(inside, "glibc's own allocations are mimalloc's");
    }

    /// Every block has its layout's alignment: each size up to 4 KiB and
    /// some larger ones, at every alignment up to 4 KiB, many blocks of
    /// each (so blocks past a page's first are checked too), then grown
    /// and shrunk by `realloc`.
    #[test]
    fn every_block_has_its_layouts_alignment() {
        let sizes = (1..=4096).chain([8191, 8192, 65_536, 100_000, 1 << 20, (1 << 22) + 48]);
        for size in sizes {
            for align in (0..=12).map(|shift| 1usize << shift) {
                let layout = Layout::from_size_align(size, align).expect("a valid layout");
                let count = if size <= 4096 { 4 } else { 2 };
                let mut blocks = Vec::with_capacity(count);
                for zeroed in [false, true] {
                    for _ in 0..count {
                        // SAFETY: a non-zero size; each block is freed below
                        // with its layout.
                        let block = unsafe {
                            if zeroed {
                                Mimalloc.alloc_zeroed(layout)
                            } else {
                                Mimalloc.alloc(layout)
                            }
                        };
                        assert!(!block.is_null(), "{size} bytes at {align}");
                        assert_eq!(block as usize % align, 0, "{size} bytes at {align}");
                        if zeroed {
                            // SAFETY: `size` bytes were just allocated.
                            let bytes = unsafe { std::slice::from_raw_parts(block, size) };
                            assert!(bytes.iter().all(|b| *b == 0), "{size} bytes zeroed");
                        }
                        blocks.push(block);
                    }
                }
                for block in blocks.iter_mut() {
                    for new_size in [size + align, size * 3, (size / 2).max(1)] {
                        // SAFETY: the block is live, of `layout` (a fresh
                        // one replaces it after each realloc).
                        let moved = unsafe { Mimalloc.realloc(*block, layout, new_size) };
                        assert!(!moved.is_null());
                        assert_eq!(moved as usize % align, 0, "{size} to {new_size} at {align}");
                        // SAFETY: freed at the new size; this test never
                        // reads the old one again.
                        unsafe {
                            Mimalloc.dealloc(
                                moved,
                                Layout::from_size_align(new_size, align).expect("valid"),
                            )
                        };
                        // SAFETY: a fresh block to go on with.
                        *block = unsafe { Mimalloc.alloc(layout) };
                        assert_eq!(*block as usize % align, 0);
                    }
                }
                for block in blocks {
                    // SAFETY: live blocks of `layout`.
                    unsafe { Mimalloc.dealloc(block, layout) };
                }
            }
        }
    }

    /// The requests that were slow before go to the plain functions, and
    /// the ones a plain block may not satisfy do not.
    #[test]
    fn plain_blocks_are_asked_for_only_where_they_are_aligned() {
        assert!(plain(720, 8));
        assert!(plain(48, 16));
        assert!(plain(3, 1));
        assert!(!plain(24, 16));
        assert!(!plain(8, 16));
        assert!(!plain(64, 32));
    }
}
