//! Fuzzes the request head parser and the chunked body decoder with
//! arbitrary bytes: neither may panic, loop, or overrun its limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rendezvous::request::http::{self, BodyKind, ChunkedDecoder, RequestHead};

fuzz_target!(|data: &[u8]| {
    let mut head = RequestHead::default();
    let _ = http::head_may_be_complete(data, data.len() / 3);
    if let Ok(Some(n)) = http::parse_head(data, &mut head) {
        assert!(n <= data.len());
        if head.body == BodyKind::Chunked {
            let mut d = ChunkedDecoder::new(1000);
            let mut out = Vec::new();
            // Feed the rest in two pieces, as a socket would.
            let rest = &data[n..];
            let mid = rest.len() / 2;
            if let Ok(used) = d.decode(&rest[..mid], &mut out) {
                let mut tail = rest[used..].to_vec();
                let _ = d.decode(&tail, &mut out);
                tail.clear();
            }
            assert!(out.len() <= 1000);
        }
    }
});
