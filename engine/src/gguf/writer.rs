//! Writing GGUF files: whole in memory for fixtures and shards, or streamed
//! a chunk at a time for models too big to hold.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::{MetaValue, DEFAULT_ALIGNMENT, MAGIC};
use crate::error::{EngineError, Result};
use crate::quant::GgmlType;

/// Builds a GGUF file in memory order: metadata first, then tensors.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(TensorSpec, Vec<u8>)>,
}

/// A tensor's directory entry before its bytes are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// GGUF tensor name.
    pub name: String,
    /// Dimensions, innermost first.
    pub dims: Vec<usize>,
    /// Storage type.
    pub dtype: GgmlType,
}

impl TensorSpec {
    /// Bytes the tensor occupies, or `None` if its rows are not whole blocks.
    pub fn n_bytes(&self) -> Option<usize> {
        let row = self.dtype.row_bytes(*self.dims.first()?)?;
        self.dims[1..].iter().try_fold(row, |n, &d| n.checked_mul(d))
    }
}

impl GgufWriter {
    /// Adds one metadata entry.
    pub fn meta(&mut self, key: &str, value: MetaValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds one tensor; `bytes` must already be in `dtype`'s block layout.
    pub fn tensor(&mut self, name: &str, dims: &[usize], dtype: GgmlType, bytes: Vec<u8>) -> &mut Self {
        self.tensors.push((TensorSpec { name: name.to_string(), dims: dims.to_vec(), dtype }, bytes));
        self
    }

    /// Writes the file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let io = |source| EngineError::Io { path: path.to_path_buf(), source };
        let specs: Vec<TensorSpec> = self.tensors.iter().map(|(s, _)| s.clone()).collect();
        let mut out = self.stream(BufWriter::new(File::create(path).map_err(io)?), &specs).map_err(io)?;
        for (_, bytes) in &self.tensors {
            out.write_data(bytes).map_err(io)?;
        }
        out.finish().map_err(io).map(drop)
    }

    /// Writes the header (this writer's metadata and the directory of
    /// `tensors`; tensors added with [`GgufWriter::tensor`] are ignored) and
    /// returns a stream that takes the tensors' bytes in order. A model too
    /// big for memory is written this way, a chunk at a time.
    pub fn stream<W: Write>(&self, out: W, tensors: &[TensorSpec]) -> std::io::Result<GgufStream<W>> {
        GgufStream::new(out, &self.metadata, tensors)
    }
}

/// The data section of a GGUF file being written: tensor bytes arrive in
/// directory order, in chunks of any size; padding between tensors is added
/// here. Errors are plain I/O errors, so the caller names the file and what
/// it was doing.
#[derive(Debug)]
pub struct GgufStream<W: Write> {
    out: W,
    sizes: Vec<usize>,
    /// Index of the tensor being written.
    current: usize,
    /// Bytes of the current tensor written so far.
    filled: usize,
}

impl<W: Write> GgufStream<W> {
    fn new(mut out: W, metadata: &[(String, MetaValue)], tensors: &[TensorSpec]) -> std::io::Result<Self> {
        let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg);
        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC.to_le_bytes());
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_string(&mut header, k);
            header.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut header, v);
        }
        let mut sizes = Vec::with_capacity(tensors.len());
        let mut offset = 0u64;
        for t in tensors {
            let n = t.n_bytes().ok_or_else(|| {
                invalid(format!("tensor `{}` of shape {:?} is not whole {} blocks", t.name, t.dims, t.dtype.name()))
            })?;
            put_string(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            header.extend_from_slice(&t.dtype.id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset += padded(n as u64);
            sizes.push(n);
        }
        header.resize(padded(header.len() as u64) as usize, 0);
        out.write_all(&header)?;
        let mut stream = Self { out, sizes, current: 0, filled: 0 };
        stream.skip_empty()?;
        Ok(stream)
    }

    /// Appends bytes of the current tensor; a chunk may end a tensor but not
    /// run into the next one.
    pub fn write_data(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let Some(&size) = self.sizes.get(self.current) else {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "data past the last tensor"));
        };
        if self.filled + bytes.len() > size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("tensor {} is {size} bytes; a chunk runs past its end", self.current),
            ));
        }
        self.out.write_all(bytes)?;
        self.filled += bytes.len();
        self.skip_empty()
    }

    /// Pads and moves on once the current tensor is complete.
    fn skip_empty(&mut self) -> std::io::Result<()> {
        while let Some(&size) = self.sizes.get(self.current) {
            if self.filled < size {
                break;
            }
            let pad = padded(size as u64) - size as u64;
            self.out.write_all(&[0u8; DEFAULT_ALIGNMENT as usize][..pad as usize])?;
            self.current += 1;
            self.filled = 0;
        }
        Ok(())
    }

    /// Checks every tensor was written in full, flushes, and returns the output.
    pub fn finish(mut self) -> std::io::Result<W> {
        if self.current < self.sizes.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("only {} of {} tensors were written", self.current, self.sizes.len()),
            ));
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

/// `n` rounded up to the data section's alignment.
fn padded(n: u64) -> u64 {
    n.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array(items) => {
            let ty = items.first().map_or(4, MetaValue::type_id);
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    fn specs() -> Vec<TensorSpec> {
        vec![
            TensorSpec { name: "a".into(), dims: vec![3], dtype: GgmlType::F32 },
            TensorSpec { name: "b".into(), dims: vec![32, 2], dtype: GgmlType::Q8_0 },
        ]
    }

    #[test]
    fn a_stream_in_odd_chunks_writes_what_the_whole_writer_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b): (Vec<u8>, Vec<u8>) = ((0..12).collect(), (0..68).map(|i| i as u8 * 3).collect());
        let mut whole = GgufWriter::default();
        whole.meta("k", MetaValue::U32(5)).tensor("a", &[3], GgmlType::F32, a.clone()).tensor(
            "b",
            &[32, 2],
            GgmlType::Q8_0,
            b.clone(),
        );
        let whole_path = dir.path().join("whole.gguf");
        whole.write(&whole_path).expect("write");

        let mut header = GgufWriter::default();
        header.meta("k", MetaValue::U32(5));
        let mut s = header.stream(Vec::new(), &specs()).expect("header");
        let all: Vec<u8> = a.iter().chain(&b).copied().collect();
        for chunk in [&all[..5], &all[5..12], &all[12..13], &all[13..]] {
            s.write_data(chunk).expect("chunk");
        }
        let streamed = s.finish().expect("finish");
        assert_eq!(streamed, std::fs::read(&whole_path).expect("read"));
        let f = GgufFile::open(&whole_path).expect("open");
        assert_eq!(f.read("b").expect("b"), b);
    }

    #[test]
    fn a_stream_rejects_chunks_across_tensors_and_missing_tensors() {
        let header = GgufWriter::default();
        let mut s = header.stream(Vec::new(), &specs()).expect("header");
        assert!(s.write_data(&[0; 13]).is_err(), "a chunk ran from `a` into `b`");
        let mut s = header.stream(Vec::new(), &specs()).expect("header");
        s.write_data(&[0; 12]).expect("a");
        assert!(s.finish().is_err(), "`b` was never written");
        let odd = [TensorSpec { name: "c".into(), dims: vec![33], dtype: GgmlType::Q8_0 }];
        assert!(header.stream(Vec::new(), &odd).is_err(), "33 is not whole Q8_0 blocks");
    }
}
