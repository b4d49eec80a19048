//! A heap meter for tests: the global allocator of each test binary that includes this
//! module counts the bytes its thread holds and their high-water mark, so a test can
//! assert how much heap a decoder held.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct Meter;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn grow(n: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(n);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn shrink(n: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(n)));
}

// SAFETY: every call goes to the system allocator unchanged; the counters are
// thread-local cells that never allocate.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            grow(new_size);
            shrink(layout.size());
        }
        p
    }
}

#[global_allocator]
static METER: Meter = Meter;

/// Runs `f`; returns its result and the most heap it held at once above the start.
pub fn peak_heap<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(Cell::get).saturating_sub(base))
}

/// What decoding a message of `len` bytes may hold: its strings and byte strings (the
/// input at most, a name copied once more while it is checked, a buffer growing by
/// doubling), and room for at most 500 names (12 KiB) however many a count claims.
pub fn heap_bound(len: usize) -> usize {
    4 * len + 16 * 1024
}

/// Decoding a presence record may also reserve room for as many addresses (32 bytes
/// each) as bytes remain; `SignedPresence::verify` caps the payload at 1 KiB first.
pub fn record_heap_bound(len: usize) -> usize {
    36 * len + 4096
}
