//! Where a stage's weight bytes live: one mapping the OS may back with
//! 2 MiB pages.
//!
//! Decoding a token reads every weight once: 110 MB for SmolLM2, which in
//! 4 KiB pages is 27,000 translations, each a TLB miss and a page walk
//! competing with the weights for memory. Gathered into one anonymous
//! mapping advised for transparent huge pages (Linux, where the host's
//! policy is `madvise` or `always`), the same bytes take about 55 pages.
//! Matrices sit in the order a forward pass reads them, each on its own
//! cache line. Measured in `docs/benchmarks.md` (session 9).

use std::ops::Range;
use std::sync::Arc;

/// Start of every matrix in the mapping: a cache line, so a matrix never
/// shares a line with its neighbour.
const ALIGN: usize = 64;

/// A matrix's bytes: its own heap buffer until its stage gathers them
/// ([`gather`]), then a range of the stage's mapping. Clones share storage,
/// as a tied lm_head shares the embedding's.
#[derive(Clone)]
pub(crate) struct WeightBytes {
    buf: Arc<Buffer>,
    range: Range<usize>,
}

enum Buffer {
    Heap(Vec<u8>),
    Mapped(memmap2::MmapMut),
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = match *self.buf {
            Buffer::Heap(_) => "heap",
            Buffer::Mapped(_) => "mapped",
        };
        write!(f, "WeightBytes({} bytes, {place})", self.range.len())
    }
}

impl WeightBytes {
    /// Bytes in a buffer of their own.
    pub(crate) fn heap(bytes: Vec<u8>) -> Self {
        let range = 0..bytes.len();
        Self { buf: Arc::new(Buffer::Heap(bytes)), range }
    }

    /// The bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        match &*self.buf {
            Buffer::Heap(v) => &v[self.range.clone()],
            Buffer::Mapped(m) => &m[self.range.clone()],
        }
    }

    /// Whether `other` is the same storage (not merely equal bytes).
    pub(crate) fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf) && self.range == other.range
    }

    /// Whether the bytes sit in a gathered mapping.
    pub(crate) fn is_mapped(&self) -> bool {
        matches!(*self.buf, Buffer::Mapped(_))
    }
}

/// Moves every part into one mapping advised for huge pages, in
/// the given order; parts that shared storage still share it. Each heap
/// buffer is freed once copied, so loading peaks at one matrix above the
/// weights. If the mapping cannot be made, the parts stay where they are:
/// the weights are the same bytes either way, only slower to reach.
pub(crate) fn gather(parts: &mut [&mut WeightBytes]) {
    // Where each part goes; a part sharing an earlier one's storage goes
    // where that one went.
    let mut place: Vec<(usize, bool)> = Vec::with_capacity(parts.len());
    let mut total = 0usize;
    for i in 0..parts.len() {
        match (0..i).find(|&j| parts[j].same(parts[i])) {
            Some(j) => place.push((place[j].0, false)),
            None => {
                let at = total.next_multiple_of(ALIGN);
                total = at + parts[i].range.len();
                place.push((at, true));
            }
        }
    }
    let mut map = match memmap2::MmapMut::map_anon(total.max(1)) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, bytes = total, "weights stay on the heap: no anonymous mapping");
            return;
        }
    };
    #[cfg(target_os = "linux")]
    if let Err(e) = map.advise(memmap2::Advice::HugePage) {
        tracing::debug!(error = %e, "weights in 4 KiB pages: the kernel refused huge pages");
    }
    let lens: Vec<usize> = parts.iter().map(|p| p.range.len()).collect();
    for (i, &(at, first)) in place.iter().enumerate() {
        if first {
            map[at..at + lens[i]].copy_from_slice(parts[i].as_slice());
            // Drops this part's hold on its heap buffer now, not at the end.
            *parts[i] = WeightBytes::heap(Vec::new());
        }
    }
    let buf = Arc::new(Buffer::Mapped(map));
    for (p, (&(at, _), &len)) in parts.iter_mut().zip(place.iter().zip(&lens)) {
        **p = WeightBytes { buf: buf.clone(), range: at..at + len };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_parts_keep_their_bytes_order_and_sharing() {
        let a = WeightBytes::heap((0..1000u32).map(|i| (i * 7) as u8).collect());
        let b = WeightBytes::heap(vec![9; 77]);
        let (mut a2, mut b2, mut a_again, mut empty) = (a.clone(), b.clone(), a.clone(), WeightBytes::heap(Vec::new()));
        gather(&mut [&mut a2, &mut b2, &mut a_again, &mut empty]);
        assert!(a2.is_mapped() && b2.is_mapped() && a_again.is_mapped() && empty.is_mapped());
        assert_eq!((a2.as_slice(), b2.as_slice(), empty.as_slice()), (a.as_slice(), b.as_slice(), &[][..]));
        // The clone still shares its original's place, and only it does.
        assert!(a_again.same(&a2) && !b2.same(&a2));
        assert_eq!(a_again.as_slice().as_ptr(), a2.as_slice().as_ptr());
        // Laid out in order, each part on its own cache line.
        let (pa, pb) = (a2.as_slice().as_ptr() as usize, b2.as_slice().as_ptr() as usize);
        assert_eq!(pb - pa, 1000usize.next_multiple_of(ALIGN));
        assert_eq!(pa % ALIGN, 0);
    }
}
