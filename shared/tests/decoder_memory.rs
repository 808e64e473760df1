//! The protocol decoder never allocates on a peer's word.
//!
//! A counting allocator records, per thread, the largest single allocation and the peak of
//! live bytes while the decoder runs. The frame decoder must never make one allocation larger
//! than its frame limit; decoding a message must use memory in proportion to the bytes that
//! actually arrived, whatever lengths those bytes declare.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use framecast_shared::protocol::{FrameDecoder, decode_message};
use proptest::prelude::*;

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn record_alloc(size: usize) {
    let _ = LIVE.try_with(|live| {
        live.set(live.get() + size);
        let _ = PEAK.try_with(|p| p.set(p.get().max(live.get())));
    });
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

fn record_free(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(size)));
}

// SAFETY: forwards to the system allocator unchanged; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record_alloc(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        record_free(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Count the moment both blocks may exist.
        record_alloc(new_size);
        record_free(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Memory used by `f`: (largest single allocation, peak live bytes above the start).
fn measure<T>(f: impl FnOnce() -> T) -> (usize, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    LARGEST.with(|l| l.set(0));
    let out = f();
    drop(out);
    (LARGEST.with(Cell::get), PEAK.with(Cell::get) - base)
}

const MAX_FRAME: u32 = 4096;

/// Decoded values take more room than their encoding (a one-byte CBOR integer becomes a
/// tree node of a few dozen bytes), so the bound is linear in the bytes received, with the
/// factor covering a node per byte and a vector's growth.
const BYTES_PER_INPUT_BYTE: usize = 256;
const SLACK: usize = 16 * 1024;

fn decode_stream(bytes: &[u8]) {
    let mut dec = FrameDecoder::new(MAX_FRAME);
    let mut input = bytes;
    while !input.is_empty() {
        if dec.decode_message(&mut input).is_err() {
            return;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_frame_decoder_never_allocates_past_the_frame_limit(
        bytes in proptest::collection::vec(any::<u8>(), 0..3 * MAX_FRAME as usize),
    ) {
        let (largest, peak) = measure(|| decode_stream(&bytes));
        prop_assert!(largest <= MAX_FRAME as usize, "one allocation of {largest} bytes");
        prop_assert!(peak <= BYTES_PER_INPUT_BYTE * MAX_FRAME as usize + SLACK, "peak {peak}");
    }

    #[test]
    fn message_decoding_allocates_in_proportion_to_the_input(
        body in proptest::collection::vec(any::<u8>(), 1..MAX_FRAME as usize),
    ) {
        let (_, peak) = measure(|| decode_message(&body));
        prop_assert!(peak <= BYTES_PER_INPUT_BYTE * body.len() + SLACK, "peak {peak} for {} bytes", body.len());
    }
}

/// CBOR bodies of a few bytes whose headers claim enormous sizes.
#[test]
fn declared_lengths_are_not_trusted() {
    let huge_array = [0x9b, 0, 0, 0, 1, 0, 0, 0, 0, 0]; // array of 2^32 items, then one
    let huge_bytes = [0x5b, 0, 0, 1, 0, 0, 0, 0, 0, 1]; // byte string of 2^40 bytes
    let huge_text = [0x7a, 0xff, 0xff, 0xff, 0xff, b'a']; // text of 4 GiB
    let huge_map = [0xbb, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff, 0]; // map of 2^31 pairs
    let mut nested = Vec::new();
    for _ in 0..300 {
        nested.extend_from_slice(&[0x9a, 0xff, 0xff, 0xff, 0xff]); // 300 nested 4G arrays
    }
    // A message map whose `gpus` claims 2^32 entries.
    let mut hello = vec![0xa2, 0x64];
    hello.extend_from_slice(b"type");
    hello.push(0x65);
    hello.extend_from_slice(b"hello");
    hello.push(0x64);
    hello.extend_from_slice(b"gpus");
    hello.extend_from_slice(&[0x9a, 0xff, 0xff, 0xff, 0xff, 0]);
    for body in [
        &huge_array[..],
        &huge_bytes,
        &huge_text,
        &huge_map,
        &nested,
        &hello,
    ] {
        let (result, (largest, peak)) = {
            let mut result = None;
            let m = measure(|| result = Some(decode_message(body)));
            (result, m)
        };
        assert!(result.is_some_and(|r| r.is_err()), "{body:02x?} decoded");
        assert!(
            peak <= SLACK + 64 * 1024,
            "peak {peak} for {} bytes",
            body.len()
        );
        assert!(
            largest <= 64 * 1024,
            "allocation of {largest} for {} bytes",
            body.len()
        );
    }
}

#[test]
fn an_oversized_header_allocates_nothing_for_its_body() {
    let mut input: &[u8] = &u32::MAX.to_be_bytes();
    let (largest, _) = measure(|| FrameDecoder::new(MAX_FRAME).decode(&mut input));
    assert!(largest < 1024, "{largest}");
}
