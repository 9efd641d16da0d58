//! The `BICSIX1` frame format (described in [`super`]): encoding the header and record headers,
//! and an incremental decoder that takes the body in whatever chunks arrive.
//!
//! This module owns the format's rules (magic, order, bounds, end record, nothing after it) and
//! nothing else: it must not do I/O, hash, or know about HTTP. The decoder never copies
//! payload: data comes out as slices of the chunks that went in.

use bytes::{Buf, Bytes};

/// First bytes of every stream.
pub(super) const MAGIC: &[u8; 8] = b"BICSIX1\n";
/// Bytes of the stream header and of each record header.
pub(super) const HEAD_LEN: usize = 16;

/// The stream header: magic and the file's size.
pub(super) fn header(size: u64) -> [u8; HEAD_LEN] {
    let mut h = [0; HEAD_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..].copy_from_slice(&size.to_be_bytes());
    h
}

/// A record header: `len` bytes at `offset` follow. `len` 0 with `offset` = size ends the stream.
pub(super) fn record_header(offset: u64, len: u64) -> [u8; HEAD_LEN] {
    let mut h = [0; HEAD_LEN];
    h[..8].copy_from_slice(&offset.to_be_bytes());
    h[8..].copy_from_slice(&len.to_be_bytes());
    h
}

/// What the decoder found, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Event {
    /// The header: the file is `size` bytes.
    Start { size: u64 },
    /// File content at `offset` (a piece of a record; a record can come in many pieces).
    Data { offset: u64, bytes: Bytes },
    /// The end record: everything is in.
    End,
}

/// Why a stream is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum WireError {
    /// Malformed: wrong magic, records out of order or out of bounds, bytes after the end.
    Protocol(String),
    /// Well-formed so far but cut short.
    Truncated(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Record,
    Payload { offset: u64, left: u64 },
    Done,
}

/// Decodes a `BICSIX1` stream fed in arbitrary chunks.
#[derive(Debug)]
pub(super) struct Decoder {
    state: State,
    /// A header being gathered across chunks.
    head: [u8; HEAD_LEN],
    have: usize,
    size: u64,
    /// Where the previous record ended: the next one may not start before it.
    next: u64,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            state: State::Header,
            head: [0; HEAD_LEN],
            have: 0,
            size: 0,
            next: 0,
        }
    }
}

impl Decoder {
    /// Takes the next chunk of the body and appends what it completes to `out`.
    pub(super) fn feed(&mut self, mut chunk: Bytes, out: &mut Vec<Event>) -> Result<(), WireError> {
        while !chunk.is_empty() {
            match self.state {
                State::Header | State::Record => {
                    let take = (HEAD_LEN - self.have).min(chunk.len());
                    self.head[self.have..self.have + take].copy_from_slice(&chunk[..take]);
                    self.have += take;
                    chunk.advance(take);
                    if self.have == HEAD_LEN {
                        self.have = 0;
                        self.on_head(out)?;
                    }
                }
                State::Payload { offset, left } => {
                    let take = left.min(chunk.len() as u64);
                    let bytes = chunk.split_to(take as usize);
                    out.push(Event::Data { offset, bytes });
                    self.state = if take == left {
                        State::Record
                    } else {
                        State::Payload {
                            offset: offset + take,
                            left: left - take,
                        }
                    };
                }
                State::Done => {
                    return Err(WireError::Protocol(format!(
                        "{} unexpected bytes after the end record",
                        chunk.len()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The body has ended: fine only after the end record.
    pub(super) fn finish(&self) -> Result<(), WireError> {
        let why = match self.state {
            State::Done => return Ok(()),
            State::Header if self.have == 0 => "the body was empty".to_owned(),
            State::Header => format!("the body ended after {} bytes of header", self.have),
            State::Record => format!(
                "the stream ended at offset {} of {} without the end record",
                self.next, self.size
            ),
            State::Payload { offset, left } => format!(
                "the stream ended inside a record, at offset {offset} of {} with {left} bytes of \
                 the record missing",
                self.size
            ),
        };
        Err(WireError::Truncated(why))
    }

    fn on_head(&mut self, out: &mut Vec<Event>) -> Result<(), WireError> {
        let (a, b) = self.head.split_at(8);
        let b = u64::from_be_bytes(b.try_into().expect("8 bytes"));
        if self.state == State::Header {
            if a != MAGIC {
                return Err(WireError::Protocol(format!(
                    "not a bicsi extent stream: it starts with \"{}\", not \"{}\"",
                    a.escape_ascii(),
                    MAGIC.escape_ascii()
                )));
            }
            self.size = b;
            self.state = State::Record;
            out.push(Event::Start { size: b });
            return Ok(());
        }
        let offset = u64::from_be_bytes(a.try_into().expect("8 bytes"));
        let len = b;
        if len == 0 {
            if offset != self.size {
                return Err(WireError::Protocol(format!(
                    "end record at offset {offset}, but the file is {} bytes",
                    self.size
                )));
            }
            self.state = State::Done;
            out.push(Event::End);
            return Ok(());
        }
        if offset < self.next {
            return Err(WireError::Protocol(format!(
                "record at offset {offset} starts before the previous one ends ({})",
                self.next
            )));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => self.next = end,
            _ => {
                return Err(WireError::Protocol(format!(
                    "record of {len} bytes at offset {offset} goes past the end of the file ({} \
                     bytes)",
                    self.size
                )));
            }
        }
        self.state = State::Payload { offset, left: len };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream for a file of `size` bytes with these records (payload: a pattern from the
    /// offset, so misplaced bytes show).
    fn encode(size: u64, records: &[(u64, u64)]) -> Vec<u8> {
        let mut s = header(size).to_vec();
        for &(offset, len) in records {
            s.extend_from_slice(&record_header(offset, len));
            s.extend((offset..offset + len).map(|i| (i % 251) as u8));
        }
        s.extend_from_slice(&record_header(size, 0));
        s
    }

    /// Feeds `stream` in chunks of `step` bytes; returns the events with adjacent data pieces
    /// joined, or the first error (from `finish` too).
    fn decode(stream: &[u8], step: usize) -> Result<Vec<Event>, WireError> {
        let mut d = Decoder::default();
        let mut events = Vec::new();
        for chunk in stream.chunks(step) {
            d.feed(Bytes::copy_from_slice(chunk), &mut events)?;
        }
        d.finish()?;
        Ok(join(events))
    }

    /// Joins adjacent data pieces, as the file they describe would.
    fn join(events: Vec<Event>) -> Vec<Event> {
        let mut joined: Vec<Event> = Vec::new();
        for e in events {
            if let (
                Some(Event::Data { offset, bytes }),
                Event::Data {
                    offset: o2,
                    bytes: b2,
                },
            ) = (joined.last_mut(), &e)
                && *offset + bytes.len() as u64 == *o2
            {
                let mut v = bytes.to_vec();
                v.extend_from_slice(b2);
                *bytes = v.into();
                continue;
            }
            joined.push(e);
        }
        joined
    }

    fn data(offset: u64, len: u64) -> Event {
        let bytes: Vec<u8> = (offset..offset + len).map(|i| (i % 251) as u8).collect();
        Event::Data {
            offset,
            bytes: bytes.into(),
        }
    }

    #[test]
    fn decodes_any_split_of_a_valid_stream() {
        let cases: &[(u64, &[(u64, u64)])] = &[
            (0, &[]),
            (100, &[]),
            (100, &[(0, 100)]),
            (1000, &[(0, 1), (1, 20), (500, 17), (999, 1)]),
            (70_000, &[(4096, 65_536)]),
        ];
        for &(size, records) in cases {
            let stream = encode(size, records);
            let mut want = vec![Event::Start { size }];
            want.extend(records.iter().map(|&(o, l)| data(o, l)));
            want.push(Event::End);
            let want = join(want);
            for step in [1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 4096, stream.len()] {
                assert_eq!(
                    decode(&stream, step).as_ref(),
                    Ok(&want),
                    "size {size}, records {records:?}, step {step}"
                );
            }
        }
    }

    #[test]
    fn rejects_malformed_and_cut_streams() {
        let good = encode(1000, &[(10, 10), (100, 50)]);
        let mut bad_magic = good.clone();
        bad_magic[6] = b'2';
        let mut after_end = good.clone();
        after_end.push(0);
        let overlap = encode(1000, &[(10, 10), (15, 10)]);
        let backwards = encode(1000, &[(100, 10), (10, 10)]);
        let past_end = encode(1000, &[(990, 20)]);
        let mut overflow = header(1000).to_vec();
        overflow.extend_from_slice(&record_header(10, u64::MAX));
        let mut early_end = header(1000).to_vec();
        early_end.extend_from_slice(&record_header(500, 0));

        let protocol: &[(&str, &[u8], &str)] = &[
            ("bad magic", &bad_magic, "not a bicsi extent stream"),
            (
                "http page",
                b"<html><body>hello</body></html>",
                "not a bicsi",
            ),
            ("after end", &after_end, "after the end record"),
            ("overlap", &overlap, "starts before the previous one ends"),
            (
                "backwards",
                &backwards,
                "starts before the previous one ends",
            ),
            ("past end", &past_end, "goes past the end of the file"),
            ("overflow", &overflow, "goes past the end of the file"),
            ("early end", &early_end, "end record at offset 500"),
        ];
        for &(name, stream, want) in protocol {
            for step in [1, 5, stream.len()] {
                match decode(stream, step) {
                    Err(WireError::Protocol(m)) => assert!(m.contains(want), "{name}: {m}"),
                    other => panic!("{name}, step {step}: {other:?}"),
                }
            }
        }

        let truncated: &[(&str, &[u8], &str)] = &[
            ("empty", b"", "empty"),
            ("in header", &good[..10], "10 bytes of header"),
            ("in record header", &good[..20], "without the end record"),
            ("in payload", &good[..40], "inside a record"),
            (
                "no end record",
                &good[..good.len() - 16],
                "without the end record",
            ),
            (
                "in end record",
                &good[..good.len() - 1],
                "without the end record",
            ),
        ];
        for &(name, stream, want) in truncated {
            for step in [1, 5, stream.len().max(1)] {
                match decode(stream, step) {
                    Err(WireError::Truncated(m)) => assert!(m.contains(want), "{name}: {m}"),
                    other => panic!("{name}, step {step}: {other:?}"),
                }
            }
        }
    }
}

/// Fuzzing entry (feature `fuzzing`, `fuzz/`): decodes `data` as a stream cut into chunks whose
/// sizes come from the input's first byte, and checks what the receiver relies on: the header
/// comes first; data lies inside the file, in order, never overlapping; the end record comes
/// once and last; `finish` agrees with whether it came.
#[cfg(feature = "fuzzing")]
pub fn fuzz(data: &[u8]) {
    let Some((&step, body)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut decoder = Decoder::default();
    let mut events = Vec::new();
    let mut failed = false;
    for piece in body.chunks(step) {
        if decoder
            .feed(Bytes::copy_from_slice(piece), &mut events)
            .is_err()
        {
            failed = true;
            break;
        }
    }
    let mut size = None;
    let mut end = 0u64;
    let mut ended = false;
    for (i, e) in events.iter().enumerate() {
        assert!(!ended, "an event after the end record");
        match e {
            Event::Start { size: s } => {
                assert_eq!(i, 0, "the header is not first");
                size = Some(*s);
            }
            Event::Data { offset, bytes } => {
                let size = size.expect("data before the header");
                let last = offset
                    .checked_add(bytes.len() as u64)
                    .expect("a record past u64");
                assert!(*offset >= end, "records overlap or go back");
                assert!(last <= size, "data past the file's size");
                end = last;
            }
            Event::End => ended = true,
        }
    }
    if !failed {
        assert_eq!(
            decoder.finish().is_ok(),
            ended,
            "finish disagrees with the end record"
        );
    }
}
