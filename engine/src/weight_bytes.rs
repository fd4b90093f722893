//! Where a stage's weight bytes live: one mapping the OS may back with
//! 2 MiB pages, filled straight from the model file.
//!
//! Decoding a token reads every weight once: 110 MB for SmolLM2, which in
//! 4 KiB pages is 27,000 translations, each a TLB miss and a page walk
//! competing with the weights for memory. Gathered into one anonymous
//! mapping advised for transparent huge pages (Linux, where the host's
//! policy is `madvise` or `always`), the same bytes take far fewer pages.
//! Matrices sit in the order a forward pass reads them, each on its own
//! cache line. The gain is measured in `docs/benchmarks.md`.

use std::ops::Range;
use std::sync::Arc;

/// Start of every matrix in the mapping: a cache line, so a matrix never
/// shares a line with its neighbour.
const ALIGN: usize = 64;

/// A matrix's bytes: a range of its stage's mapping ([`WeightArena`]), or
/// a heap buffer of its own where no mapping could be made. Clones share
/// storage, as a tied lm_head shares the embedding's.
#[derive(Clone)]
pub(crate) struct WeightBytes {
    buf: Arc<Buffer>,
    range: Range<usize>,
}

enum Buffer {
    Heap(Vec<u8>),
    Mapped(memmap2::MmapMut),
    /// Claimed in a [`WeightArena`] that is still being filled.
    Pending,
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = match *self.buf {
            Buffer::Heap(_) => "heap",
            Buffer::Mapped(_) => "mapped",
            Buffer::Pending => "pending",
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
            Buffer::Pending => &[],
        }
    }

    /// Whether `other` is the same storage (not merely equal bytes).
    pub(crate) fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf) && self.range == other.range
    }

    /// Whether the bytes sit in a stage's finished mapping.
    pub(crate) fn is_mapped(&self) -> bool {
        matches!(*self.buf, Buffer::Mapped(_))
    }
}

/// A stage's weight mapping while it is being filled. It holds one slot
/// per matrix, back to back in the order a forward pass reads them, each
/// from a cache line; loader threads read matrices from the file straight
/// into their slots ([`WeightArena::slots`]), packing them on the way a
/// run of tiles at a time, then each slot's filled bytes are claimed
/// ([`WeightArena::claim`]) and [`WeightArena::finish`] points every
/// claimed part at the mapping. So loading never holds the weights twice:
/// at most one run of tiles per loader thread sits beside them. A slot's bytes past what its matrix
/// fills are never written, so never backed by memory.
pub(crate) struct WeightArena {
    map: Option<memmap2::MmapMut>,
    starts: Vec<usize>,
    sizes: Vec<usize>,
    pending: Arc<Buffer>,
}

impl WeightArena {
    /// Reserves slots of `sizes` bytes, advised for huge pages on Linux.
    /// If the mapping cannot be made, [`WeightArena::slots`] is `None` and
    /// the caller keeps matrices on the heap instead: the same bytes, only
    /// slower to reach.
    pub(crate) fn new(sizes: &[usize]) -> Self {
        let mut starts = Vec::with_capacity(sizes.len());
        let mut end = 0usize;
        for &len in sizes {
            let start = end.next_multiple_of(ALIGN);
            starts.push(start);
            end = start + len;
        }
        let map = match memmap2::MmapMut::map_anon(end.max(1)) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::debug!(error = %e, bytes = end, "weights stay on the heap: no anonymous mapping");
                None
            }
        };
        #[cfg(target_os = "linux")]
        if let Some(Err(e)) = map.as_ref().map(|m| m.advise(memmap2::Advice::HugePage)) {
            tracing::debug!(error = %e, "weights in 4 KiB pages: the kernel refused huge pages");
        }
        Self { map, starts, sizes: sizes.to_vec(), pending: Arc::new(Buffer::Pending) }
    }

    /// Every slot, to be filled (by several threads at once if need be);
    /// `None` without a mapping.
    pub(crate) fn slots(&mut self) -> Option<Vec<&mut [u8]>> {
        let mut rest: &mut [u8] = self.map.as_mut()?;
        let mut at = 0;
        let mut out = Vec::with_capacity(self.sizes.len());
        for (&start, &len) in self.starts.iter().zip(&self.sizes) {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - at);
            let (slot, tail) = tail.split_at_mut(len);
            out.push(slot);
            rest = tail;
            at = start + len;
        }
        Some(out)
    }

    /// Claims the first `len` bytes of slot `i` (already written) as one
    /// part. Its bytes read as empty until [`WeightArena::finish`].
    pub(crate) fn claim(&self, i: usize, len: usize) -> WeightBytes {
        debug_assert!(self.map.is_some() && len <= self.sizes[i]);
        WeightBytes { buf: self.pending.clone(), range: self.starts[i]..self.starts[i] + len }
    }

    /// Points every claimed part among `parts` at the filled mapping; parts
    /// on the heap stay there.
    pub(crate) fn finish(self, parts: &mut [&mut WeightBytes]) {
        let Some(map) = self.map else { return };
        let buf = Arc::new(Buffer::Mapped(map));
        for p in parts.iter_mut().filter(|p| Arc::ptr_eq(&p.buf, &self.pending)) {
            p.buf = buf.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claimed_parts_keep_their_bytes_order_and_sharing_once_finished() {
        let (a, b): (Vec<u8>, Vec<u8>) = ((0..1000u32).map(|i| (i * 7) as u8).collect(), vec![9; 77]);
        // Slots larger than what fills them, as a packed layout's bound is.
        let mut arena = WeightArena::new(&[1010, 80, 0]);
        let mut slots = arena.slots().expect("mapping");
        slots[0][..a.len()].copy_from_slice(&a);
        slots[1][..b.len()].copy_from_slice(&b);
        assert_eq!(slots.iter().map(|s| s.len()).collect::<Vec<_>>(), [1010, 80, 0]);
        let (mut a2, mut b2, mut empty) = (arena.claim(0, a.len()), arena.claim(1, b.len()), arena.claim(2, 0));
        let mut a_again = a2.clone();
        let mut heap = WeightBytes::heap(vec![5; 10]);
        assert!(a2.as_slice().is_empty() && !a2.is_mapped(), "pending until finished");
        arena.finish(&mut [&mut a2, &mut b2, &mut a_again, &mut empty, &mut heap]);
        assert!(a2.is_mapped() && b2.is_mapped() && a_again.is_mapped() && empty.is_mapped());
        assert!(!heap.is_mapped() && heap.as_slice() == [5; 10], "a heap part stays where it is");
        assert_eq!((a2.as_slice(), b2.as_slice(), empty.as_slice()), (&a[..], &b[..], &[][..]));
        // The clone still shares its original's place, and only it does.
        assert!(a_again.same(&a2) && !b2.same(&a2));
        assert_eq!(a_again.as_slice().as_ptr(), a2.as_slice().as_ptr());
        // Laid out in order, each slot on its own cache line.
        let (pa, pb) = (a2.as_slice().as_ptr() as usize, b2.as_slice().as_ptr() as usize);
        assert_eq!(pb - pa, 1010usize.next_multiple_of(ALIGN));
        assert_eq!(pa % ALIGN, 0);
    }
}
