//! Memory for the shards' hash tables, mapped straight from the kernel.
//!
//! A shard's table starts small and doubles as the store grows
//! (`state::shard`). From the heap, each table it outgrew was freed inside
//! huge pages the heap keeps whole (`main::keep_huge_pages`), and the
//! holes it left were filled only slowly: a 100k-key store held 4-6 MiB
//! more than with tables sized once up front. Mapped on its own, a
//! table's memory goes back to the kernel the moment a bigger one replaces
//! it, and a big one is aligned to and advised into huge pages like the
//! heap, because its lookups land anywhere in it.
//!
//! This module only hands out and takes back memory; it never decides
//! sizes, and it leaves small blocks to the heap.

use allocator_api2::alloc::{AllocError, Allocator, Global, Layout};
use std::ptr::NonNull;

/// Blocks at least this big get their own mapping; smaller ones (a new or
/// tiny table) come from the heap.
const MAP_MIN: usize = 1 << 16;
/// Mappings at least this big are aligned to, sized in and advised into
/// transparent huge pages.
const HUGE_PAGE: usize = 2 << 20;
/// What `mmap` aligns to at least.
const PAGE: usize = 4096;

/// The allocator for the shards' hash tables (see the module doc).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mapped;

/// The length of a mapped block's mapping: a big one is whole huge pages,
/// so all of it can be one (the table's tail is as hot as its head).
fn map_len(size: usize) -> usize {
    if size >= HUGE_PAGE {
        size.next_multiple_of(HUGE_PAGE)
    } else {
        size
    }
}

/// Whether a block of `layout` gets its own mapping. `allocate` and
/// `deallocate` see the same layout for a block, so they always agree:
/// `allocate` returns exactly `layout.size()` bytes, because hashbrown
/// uses any extra length it is given and later frees with a layout
/// recomputed from its bucket count. Never return the page-rounded length.
fn mapped(layout: Layout) -> bool {
    layout.size() >= MAP_MIN && layout.align() <= PAGE
}

// SAFETY: blocks from the heap are handed to and taken back from `Global`
// unchanged. A mapped block is the start of a fresh private anonymous
// mapping of `map_len(layout.size())` bytes (page aligned, so aligned for
// any `layout.align()` up to `PAGE`, which `mapped` requires), valid and
// unaliased until `deallocate` unmaps exactly that range. `Mapped` holds no
// state, so any copy may free what another allocated.
unsafe impl Allocator for Mapped {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if !mapped(layout) {
            return Global.allocate(layout);
        }
        let size = layout.size();
        let len = map_len(size);
        // A big block starts on a huge-page boundary, or only the aligned
        // 2 MiB spans inside it could be huge pages (2 of a 5 MiB table's 5,
        // in one look at a running server): map a huge page more than
        // needed, then unmap the unaligned head and the tail.
        let reserve = if size >= HUGE_PAGE { len + HUGE_PAGE } else { len };
        // SAFETY: a new anonymous mapping touches no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(AllocError);
        }
        let mut start = p.cast::<u8>();
        if size >= HUGE_PAGE {
            let head = (p as usize).next_multiple_of(HUGE_PAGE) - p as usize;
            let tail = reserve - head - len;
            // SAFETY: head and tail are page-aligned pieces of the mapping
            // just made, outside the `len` bytes kept from `p + head`.
            unsafe {
                start = start.add(head);
                if head > 0 {
                    libc::munmap(p, head);
                }
                if tail > 0 {
                    libc::munmap(start.add(len).cast(), tail);
                }
                // Advice only: without transparent huge pages it changes
                // nothing.
                libc::madvise(start.cast(), len, libc::MADV_HUGEPAGE);
            }
        }
        let p = NonNull::new(start).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, size))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if !mapped(layout) {
            // SAFETY: the caller passes a block `allocate` took from
            // `Global` with this layout.
            return unsafe { Global.deallocate(ptr, layout) };
        }
        // SAFETY: `ptr` is the start of a mapping of `map_len(layout.size())`
        // bytes made by `allocate`, and the caller no longer uses it. The
        // range is right, so munmap can fail only when splitting a merged
        // mapping would pass `vm.max_map_count`; the table's memory then
        // stays mapped (a leak, never a fault).
        let rc = unsafe { libc::munmap(ptr.as_ptr().cast(), map_len(layout.size())) };
        debug_assert_eq!(rc, 0, "munmap of a table");
    }
}

// That a big block is its own mapping and leaves when freed is checked in
// `tests/memory.rs`, a process of its own: here other tests' threads map
// memory meanwhile and could reuse the freed range.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_big_page_aligned_blocks_are_mapped_and_the_rest_round_trip() {
        let layout = Layout::from_size_align(MAP_MIN - 1, 16).unwrap();
        assert!(!mapped(layout));
        assert!(!mapped(Layout::from_size_align(MAP_MIN, 2 * PAGE).unwrap()));
        let block = Mapped.allocate(layout).unwrap();
        // SAFETY: allocated above with this layout, not used after.
        unsafe { Mapped.deallocate(block.cast(), layout) };
    }

    #[test]
    fn a_table_grows_through_mapped_blocks() {
        let mut t = hashbrown::HashTable::with_capacity_in(4, Mapped);
        for i in 0..200_000u64 {
            t.insert_unique(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), i, |&v| v.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        for i in (0..200_000u64).step_by(997) {
            assert_eq!(t.find(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), |&v| v == i), Some(&i));
        }
    }
}
