//! Fuzzes the request head parser and the chunked body decoder with
//! arbitrary bytes: neither may panic, loop, or overrun its limits, and the
//! decoder's answer must not depend on where the bytes were split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rendezvous::request::http::{self, BodyKind, ChunkedDecoder, RequestHead};

fuzz_target!(|data: &[u8]| {
    let mut head = RequestHead::default();
    let _ = http::head_may_be_complete(data, data.len() / 3);
    if let Ok(Some(n)) = http::parse_head(data, &mut head) {
        assert!(n <= data.len());
        if head.body == BodyKind::Chunked {
            let rest = &data[n..];
            let run = |split: usize| {
                let mut d = ChunkedDecoder::new(1000);
                let mut out = Vec::new();
                let r = d
                    .decode(&rest[..split], &mut out)
                    .and_then(|used| d.decode(&rest[used..], &mut out).map(|m| used + m));
                assert!(out.len() <= 1000);
                r.map(|used| (used, d.is_done(), out))
            };
            // Whole, and fed in two pieces as a socket would: the same answer.
            let whole = run(rest.len());
            for split in [rest.len() / 2, rest.len() / 3, 1.min(rest.len())] {
                assert_eq!(run(split), whole, "split at {split}");
            }
        }
    }
});
