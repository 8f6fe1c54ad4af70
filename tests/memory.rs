//! The shards' table allocator (`memory::Mapped`) in a process of its own:
//! a big block is a mapping of its own, writable end to end, and leaves
//! the process when freed. One test, so no other thread maps memory while
//! it looks at `/proc/self/maps`.

use allocator_api2::alloc::{Allocator, Layout};
use rendezvous::memory::Mapped;

/// Whether `addr` lies in a mapping of this process.
fn is_mapped(addr: usize) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().any(|l| {
        let range = l.split_whitespace().next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (usize::from_str_radix(a, 16).unwrap(), usize::from_str_radix(b, 16).unwrap());
        (a..b).contains(&addr)
    })
}

#[test]
fn a_big_block_is_its_own_mapping_and_goes_back_when_freed() {
    // 64 KiB (the smallest mapped block) and a table big enough to be
    // advised into huge pages, of an odd size.
    for size in [64 << 10, (2 << 20) + 12_345] {
        let layout = Layout::from_size_align(size, 16).unwrap();
        let block = Mapped.allocate(layout).unwrap();
        assert_eq!(block.len(), size);
        let p = block.cast::<u8>().as_ptr();
        assert_eq!(p as usize % 4096, 0, "a mapping starts on a page");
        if size >= 2 << 20 {
            assert_eq!(p as usize % (2 << 20), 0, "a big one on a huge page");
        }
        // SAFETY: the block is `size` writable bytes, ours until freed.
        unsafe {
            p.write_bytes(0xab, size);
            assert_eq!(*p.add(size - 1), 0xab);
        }
        // The mapping runs to the end of the block's last huge page.
        let last =
            if size >= 2 << 20 { p as usize + size.next_multiple_of(2 << 20) - 1 } else { p as usize + size - 1 };
        assert!(is_mapped(last));
        // SAFETY: allocated above with this layout, not used after.
        unsafe { Mapped.deallocate(block.cast(), layout) };
        assert!(!is_mapped(last), "a freed table's memory is unmapped");
    }
}
