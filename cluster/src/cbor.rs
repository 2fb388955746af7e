//! The few CBOR items an envelope is made of (RFC 8949), written and read by hand.
//!
//! Envelopes are on the path of every message, and a general serde codec spends most of its time
//! on generality this fixed shape does not need. Only definite-length arrays, text strings, byte
//! strings and `null` are handled; everything else is a [`CborError`]. Reading never panics and
//! never allocates: every length is checked against the bytes that are actually there.

use bytes::BufMut;

/// Major type of an array.
pub(crate) const ARRAY: u8 = 4;
/// Major type of a byte string.
pub(crate) const BYTES: u8 = 2;
/// Major type of a UTF-8 text string.
pub(crate) const TEXT: u8 = 3;
/// The single byte of `null` (major type 7, simple value 22).
pub(crate) const NULL: u8 = 0xf6;

/// Why a CBOR item could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CborError {
    /// The input ended inside an item.
    #[error("truncated at byte {0}")]
    Truncated(usize),
    /// An item of another type than the one expected.
    #[error("expected {expected} at byte {at}, found initial byte {found:#04x}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// Offset of the item.
        at: usize,
        /// Its initial byte.
        found: u8,
    },
    /// Indefinite lengths and reserved additional-information values are not accepted.
    #[error("unsupported length encoding at byte {0}")]
    UnsupportedLength(usize),
    /// A text string that is not UTF-8.
    #[error("text at byte {0} is not UTF-8")]
    NotUtf8(usize),
    /// Bytes left over after the last item.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// Bytes an item header with argument `n` takes.
pub(crate) fn header_len(n: u64) -> usize {
    match n {
        0..24 => 1,
        24..0x100 => 2,
        0x100..0x1_0000 => 3,
        0x1_0000..0x1_0000_0000 => 5,
        _ => 9,
    }
}

/// Writes the shortest header of an item of type `major` with argument `n`.
pub(crate) fn put_header(out: &mut impl BufMut, major: u8, n: u64) {
    let m = major << 5;
    match header_len(n) {
        1 => out.put_u8(m | n as u8),
        2 => {
            out.put_u8(m | 24);
            out.put_u8(n as u8);
        }
        3 => {
            out.put_u8(m | 25);
            out.put_u16(n as u16);
        }
        5 => {
            out.put_u8(m | 26);
            out.put_u32(n as u32);
        }
        _ => {
            out.put_u8(m | 27);
            out.put_u64(n);
        }
    }
}

/// Reads items from the front of a slice.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CborError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or(CborError::Truncated(self.buf.len()))?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, CborError> {
        Ok(self.take(1)?[0])
    }

    /// The argument of a header whose initial byte (already read, at `at`) is `initial`.
    fn argument(&mut self, initial: u8, at: usize) -> Result<u64, CborError> {
        let mut be = |n: usize| -> Result<u64, CborError> {
            Ok(self
                .take(n)?
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
        };
        match initial & 0x1f {
            n @ 0..24 => Ok(u64::from(n)),
            24 => be(1),
            25 => be(2),
            26 => be(4),
            27 => be(8),
            _ => Err(CborError::UnsupportedLength(at)),
        }
    }

    /// Reads a header of type `major` and returns its argument.
    pub(crate) fn header(&mut self, major: u8, expected: &'static str) -> Result<u64, CborError> {
        let at = self.pos;
        let initial = self.byte()?;
        if initial >> 5 != major {
            return Err(CborError::Unexpected {
                expected,
                at,
                found: initial,
            });
        }
        self.argument(initial, at)
    }

    /// The content of a string of type `major` (text or bytes), as a range of the input.
    pub(crate) fn string(
        &mut self,
        major: u8,
        expected: &'static str,
    ) -> Result<std::ops::Range<usize>, CborError> {
        let len = self.header(major, expected)?;
        let len = usize::try_from(len).map_err(|_| CborError::Truncated(self.buf.len()))?;
        let start = self.pos;
        self.take(len)?;
        Ok(start..self.pos)
    }

    /// A text string.
    pub(crate) fn text(&mut self) -> Result<&'a str, CborError> {
        let at = self.pos;
        let range = self.string(TEXT, "a text string")?;
        std::str::from_utf8(&self.buf[range]).map_err(|_| CborError::NotUtf8(at))
    }

    /// True (and consumed) when the next item is `null`.
    pub(crate) fn null(&mut self) -> bool {
        let is_null = self.buf.get(self.pos) == Some(&NULL);
        if is_null {
            self.pos += 1;
        }
        is_null
    }

    /// Fails unless every byte was read.
    pub(crate) fn finish(&self) -> Result<(), CborError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(CborError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_shortest_and_read_back() {
        for n in [
            0u64,
            23,
            24,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_header(&mut out, ARRAY, n);
            assert_eq!(out.len(), header_len(n), "{n}");
            let mut r = Reader::new(&out);
            assert_eq!(r.header(ARRAY, "an array"), Ok(n));
            assert_eq!(r.finish(), Ok(()));
        }
    }

    #[test]
    fn strings_are_bounded_by_the_input() {
        // A byte string that claims 2^64-1 bytes, and one that claims 10 with 3 present.
        let mut r = Reader::new(b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff");
        assert!(matches!(
            r.string(BYTES, "bytes"),
            Err(CborError::Truncated(_))
        ));
        let mut r = Reader::new(b"\x4aabc");
        assert_eq!(r.string(BYTES, "bytes"), Err(CborError::Truncated(4)));
    }

    #[test]
    fn unsupported_and_mistyped_items_are_errors() {
        assert_eq!(
            Reader::new(b"\x5f\x41a\xff").string(BYTES, "bytes"),
            Err(CborError::UnsupportedLength(0))
        );
        assert!(matches!(
            Reader::new(b"\x41a").text(),
            Err(CborError::Unexpected { found: 0x41, .. })
        ));
        assert_eq!(
            Reader::new(b"\x62\xff\xfe").text(),
            Err(CborError::NotUtf8(0))
        );
        assert_eq!(Reader::new(b"").text(), Err(CborError::Truncated(0)));
        let mut r = Reader::new(b"\xf6\xf6");
        assert!(r.null());
        assert_eq!(r.finish(), Err(CborError::Trailing(1)));
    }
}
