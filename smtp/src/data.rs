//! The DATA phase decoder: finds the end of data, removes dot-stuffing, and refuses the bare
//! `<LF>` and bare `<CR>` forms that SMTP smuggling relies on. It also notes any NUL byte, which
//! the session refuses once the message has ended: a next hop that drops NULs would read
//! `<CRLF>NUL.<CRLF>` as an end of data, another way to smuggle a second message. Body bytes
//! come out as slices of the receive buffer (`Bytes`), never copied.

use bytes::{Bytes, BytesMut};

/// A line longer than this is passed on in pieces instead of held until its end.
const LONG_LINE_FLUSH: usize = 32 * 1024;

/// A line ending that RFC 5321 forbids; the session answers it and disconnects.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum DataError {
    /// `<LF>` not preceded by `<CR>`.
    BareLf,
    /// `<CR>` not followed by `<LF>`.
    BareCr,
}

/// State of one DATA phase.
#[derive(Debug)]
pub struct DataDecoder {
    at_line_start: bool,
    saw_nul: bool,
    size: u64,
    size_max: u64,
}

impl DataDecoder {
    /// A decoder for a message of at most `size_max` bytes (after unstuffing).
    pub fn new(size_max: u64) -> Self {
        DataDecoder {
            at_line_start: true,
            saw_nul: false,
            size: 0,
            size_max,
        }
    }

    /// Bytes of body seen so far, including any past the limit.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True once a NUL byte was seen in the body (the end-of-data line included).
    pub fn saw_nul(&self) -> bool {
        self.saw_nul
    }

    /// True once the body exceeded the limit; later chunks are then dropped, not returned.
    pub fn too_big(&self) -> bool {
        self.size > self.size_max
    }

    /// Consumes what it can of `buf`, appending body chunks to `out`. Returns `Ok(true)` when
    /// the end-of-data line was consumed; `buf` then holds whatever the client sent after it.
    pub fn decode(&mut self, buf: &mut BytesMut, out: &mut Vec<Bytes>) -> Result<bool, DataError> {
        let take = match memchr::memrchr(b'\n', buf) {
            Some(p) => p + 1,
            // Keep the last byte back so a CR at the cut is judged with what follows it.
            None if buf.len() > LONG_LINE_FLUSH => buf.len() - 1,
            None => return Ok(false),
        };
        let b = buf.split_to(take).freeze();
        let mut i = 0;
        let mut seg = 0;
        while i < b.len() {
            let line_end = memchr::memchr(b'\n', &b[i..]).map(|p| i + p + 1);
            let end = line_end.unwrap_or(b.len());
            let line = &b[i..end];
            if line_end.is_some() && (line.len() < 2 || line[line.len() - 2] != b'\r') {
                return Err(DataError::BareLf);
            }
            let cr_allowed_at = if line_end.is_some() {
                line.len() - 2
            } else {
                usize::MAX
            };
            if let Some(p) = memchr::memchr(b'\r', line) {
                if p != cr_allowed_at {
                    return Err(DataError::BareCr);
                }
            }
            if self.at_line_start && line[0] == b'.' {
                self.emit(b.slice(seg..i), out);
                if line == b".\r\n" {
                    self.saw_nul |= memchr::memchr(0, &b[..i]).is_some();
                    let mut rest = BytesMut::from(&b[end..]);
                    rest.extend_from_slice(buf);
                    *buf = rest;
                    return Ok(true);
                }
                seg = i + 1;
            }
            self.at_line_start = line_end.is_some();
            i = end;
        }
        self.saw_nul |= memchr::memchr(0, &b).is_some();
        self.emit(b.slice(seg..), out);
        Ok(false)
    }

    fn emit(&mut self, chunk: Bytes, out: &mut Vec<Bytes>) {
        if chunk.is_empty() {
            return;
        }
        self.size += chunk.len() as u64;
        if !self.too_big() {
            out.push(chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8], size_max: u64) -> (Result<bool, DataError>, Vec<u8>, Vec<u8>) {
        let mut dec = DataDecoder::new(size_max);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        let r = dec.decode(&mut buf, &mut out);
        (r, out.concat(), buf.to_vec())
    }

    #[test]
    fn unstuffs_and_stops_at_the_end_marker() {
        let (r, body, rest) = run(b"Subject: x\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n", 1000);
        assert_eq!(r, Ok(true));
        assert_eq!(body, b"Subject: x\r\n\r\n.leading dot\r\n");
        assert_eq!(rest, b"QUIT\r\n");
    }

    #[test]
    fn empty_body() {
        let (r, body, rest) = run(b".\r\n", 10);
        assert_eq!((r, body.len(), rest.len()), (Ok(true), 0, 0));
    }

    #[test]
    fn smuggling_forms_never_end_data() {
        for evil in [
            &b"a\r\n\n.\n\r\nMAIL FROM:<x@y>\r\n"[..],
            b"a\r\n.\nMAIL FROM:<x@y>\r\n",
            b"a\n.\r\n",
            b"a\r\n\r.\r\n",
            b"a\r\n.\r\r\n",
            b"a\r.\r\n",
        ] {
            let (r, _, _) = run(evil, 1000);
            assert!(r.is_err(), "{:?}", String::from_utf8_lossy(evil));
        }
    }

    #[test]
    fn split_anywhere_gives_the_same_result() {
        let input = b"Line one\r\n..two\r\n.three\r\n\r\nfour\r\n.\r\nNOOP\r\n";
        for cut in 0..input.len() {
            let mut dec = DataDecoder::new(1000);
            let mut buf = BytesMut::from(&input[..cut]);
            let mut out = Vec::new();
            let mut done = dec.decode(&mut buf, &mut out).unwrap();
            buf.extend_from_slice(&input[cut..]);
            if !done {
                done = dec.decode(&mut buf, &mut out).unwrap();
            }
            assert!(done, "cut {cut}");
            assert_eq!(
                out.concat(),
                b"Line one\r\n.two\r\nthree\r\n\r\nfour\r\n",
                "cut {cut}"
            );
            assert_eq!(&buf[..], b"NOOP\r\n");
        }
    }

    #[test]
    fn very_long_lines_stream_without_waiting_for_their_end() {
        let mut dec = DataDecoder::new(1 << 30);
        let mut buf = BytesMut::from(&vec![b'x'; 100_000][..]);
        let mut out = Vec::new();
        assert_eq!(dec.decode(&mut buf, &mut out), Ok(false));
        assert_eq!(out.concat().len(), 99_999);
        buf.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(dec.decode(&mut buf, &mut out), Ok(true));
        assert_eq!(out.concat().len(), 100_002);
    }

    #[test]
    fn oversize_is_counted_but_not_kept() {
        let mut dec = DataDecoder::new(10);
        let mut buf = BytesMut::from(&b"0123456789\r\nabc\r\n.\r\n"[..]);
        let mut out = Vec::new();
        assert_eq!(dec.decode(&mut buf, &mut out), Ok(true));
        assert!(dec.too_big());
        assert_eq!(dec.size(), 17);
    }

    #[test]
    fn notes_nul_in_the_message_but_not_in_what_follows_its_end() {
        for evil in [
            &b"a\r\n\0.\r\nMAIL FROM:<x@y>\r\n.\r\n"[..],
            b"a\r\n.\0\r\nsmuggled\r\n.\r\n",
            b"\0\r\n.\r\n",
        ] {
            let mut dec = DataDecoder::new(1000);
            let mut buf = BytesMut::from(evil);
            let mut out = Vec::new();
            assert_eq!(dec.decode(&mut buf, &mut out), Ok(true));
            assert!(dec.saw_nul(), "{evil:?}");
            assert!(buf.is_empty(), "NUL does not end the data: {buf:?}");
        }
        let mut dec = DataDecoder::new(1000);
        let mut buf = BytesMut::from(&b"clean\r\n.\r\nNOOP \0\r\n"[..]);
        assert_eq!(dec.decode(&mut buf, &mut Vec::new()), Ok(true));
        assert!(!dec.saw_nul());
        assert_eq!(&buf[..], b"NOOP \0\r\n");
    }
}
