//! Reading and writing GGUF files.
//!
//! The reader parses the header, the metadata and the tensor directory, then
//! reads tensor bytes one tensor at a time, so a stage that holds layers
//! 10..20 never touches the pages of the others. Every length in the header is
//! checked against the file size before anything is allocated: a truncated or
//! random file is an error, not an out-of-memory abort.
//!
//! The writer (`gguf/writer.rs`) exists for the tests' tiny random models,
//! for cutting a stage's slice out of a full model, and for streaming
//! synthetic full-size models to disk.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};
use crate::quant::GgmlType;

mod writer;
pub use writer::{GgufStream, GgufWriter, TensorSpec};

pub(crate) const MAGIC: u32 = 0x4655_4747; // "GGUF" little-endian
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;
/// Longest string or array the reader accepts; real vocabularies are ~250k.
const MAX_ITEMS: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;

/// One metadata value, typed as GGUF types it.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// `uint8`
    U8(u8),
    /// `int8`
    I8(i8),
    /// `uint16`
    U16(u16),
    /// `int16`
    I16(i16),
    /// `uint32`
    U32(u32),
    /// `int32`
    I32(i32),
    /// `uint64`
    U64(u64),
    /// `int64`
    I64(i64),
    /// `float32`
    F32(f32),
    /// `float64`
    F64(f64),
    /// `bool`
    Bool(bool),
    /// UTF-8 string
    String(String),
    /// Homogeneous array
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, whatever integer width it was stored in.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, whatever integer width it was stored in.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float (integers are converted).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            #[allow(clippy::cast_precision_loss)]
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub(crate) fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::String(_) => 8,
            Self::Array(_) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }
}

/// The key/value metadata of a GGUF file, with typed getters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata(pub BTreeMap<String, MetaValue>);

impl Metadata {
    /// The raw value under `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.0.get(key)
    }

    /// A string value.
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An integer value, as `usize`.
    pub fn usize(&self, key: &str) -> Option<usize> {
        self.get(key)?.as_u64().and_then(|v| usize::try_from(v).ok())
    }

    /// A float value.
    #[allow(clippy::cast_possible_truncation)]
    pub fn f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f64().map(|v| v as f32)
    }

    /// A boolean value.
    pub fn bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            MetaValue::Bool(b) => Some(*b),
            v => v.as_u64().map(|n| n != 0),
        }
    }

    /// An array of strings.
    pub fn str_array(&self, key: &str) -> Option<Vec<&str>> {
        match self.get(key)? {
            MetaValue::Array(items) => items
                .iter()
                .map(|v| match v {
                    MetaValue::String(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    /// An array of integers.
    pub fn i64_array(&self, key: &str) -> Option<Vec<i64>> {
        match self.get(key)? {
            MetaValue::Array(items) => items.iter().map(MetaValue::as_i64).collect(),
            _ => None,
        }
    }

    /// An array of floats.
    #[allow(clippy::cast_possible_truncation)]
    pub fn f32_array(&self, key: &str) -> Option<Vec<f32>> {
        match self.get(key)? {
            MetaValue::Array(items) => items.iter().map(|v| v.as_f64().map(|f| f as f32)).collect(),
            _ => None,
        }
    }
}

/// Where one tensor sits in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Dimensions, innermost (contiguous) first, as GGUF stores them.
    pub dims: Vec<usize>,
    /// Storage type.
    pub dtype: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    /// Size in bytes.
    pub n_bytes: usize,
}

/// An open GGUF file: metadata and tensor directory parsed, tensor data unread.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    file: File,
    data_offset: u64,
    /// The file's metadata.
    pub metadata: Metadata,
    /// The tensor directory, by name.
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl GgufFile {
    /// Opens `path` and parses everything but the tensor data.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| EngineError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut r = Reader { inner: BufReader::new(&file), file_len };
        if r.u32()? != MAGIC {
            return Err(EngineError::Gguf("not a GGUF file (bad magic)".into()));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(EngineError::Gguf(format!("unsupported GGUF version {version}")));
        }
        let n_tensors = r.count("tensor count")?;
        let n_kv = r.count("metadata count")?;
        let mut metadata = Metadata::default();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0)?;
            metadata.0.insert(key, value);
        }
        let mut tensors = BTreeMap::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let info = r.tensor_info(&name)?;
            if tensors.insert(name.clone(), info).is_some() {
                return Err(EngineError::Gguf(format!("tensor `{name}` appears twice")));
            }
        }
        let alignment = metadata.get("general.alignment").and_then(MetaValue::as_u64).unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(EngineError::Gguf(format!("bad alignment {alignment}")));
        }
        let header_end = r.inner.stream_position().map_err(io)?;
        let data_offset = header_end.div_ceil(alignment) * alignment;
        for (name, t) in &tensors {
            let end = data_offset.checked_add(t.offset).and_then(|o| o.checked_add(t.n_bytes as u64));
            if end.is_none_or(|end| end > file_len) {
                return Err(EngineError::Gguf(format!(
                    "tensor `{name}` ({} bytes of {} at offset {}) extends past the end of the file \
                     ({file_len} bytes; truncated?)",
                    t.n_bytes,
                    t.dtype.name(),
                    data_offset.saturating_add(t.offset),
                )));
            }
        }
        Ok(Self { path: path.to_path_buf(), file, data_offset, metadata, tensors })
    }

    /// The tensor's directory entry, or a typed error naming it.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| EngineError::MissingTensor(name.to_string()))
    }

    /// Reads one tensor's raw bytes.
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.info(name)?.n_bytes];
        self.read_into(name, &mut buf)?;
        Ok(buf)
    }

    /// Reads the first `out.len()` bytes of a tensor into `out`, which
    /// must not be longer than the tensor: straight into where a loader
    /// keeps them, with no buffer between.
    pub fn read_into(&self, name: &str, out: &mut [u8]) -> Result<()> {
        self.read_at(name, 0, out)
    }

    /// Reads bytes `start..start + out.len()` of a tensor into `out`: a
    /// loader reads a large tensor a run of rows at a time.
    pub fn read_at(&self, name: &str, start: usize, out: &mut [u8]) -> Result<()> {
        let info = self.info(name)?;
        if start.checked_add(out.len()).is_none_or(|end| end > info.n_bytes) {
            return Err(EngineError::Gguf(format!(
                "tensor `{name}` holds {} bytes, not {} from byte {start}",
                info.n_bytes,
                out.len()
            )));
        }
        self.file
            .read_exact_at(out, self.data_offset + info.offset + start as u64)
            .map_err(|source| EngineError::Io { path: self.path.clone(), source })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

struct Reader<R> {
    inner: R,
    file_len: u64,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b).map_err(|_| EngineError::Gguf("unexpected end of file in header".into()))?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        self.bytes().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64> {
        self.bytes().map(u64::from_le_bytes)
    }

    /// A count that must be plausible for a file of this size.
    fn count(&mut self, what: &str) -> Result<u64> {
        let n = self.u64()?;
        if n > MAX_ITEMS || n > self.file_len {
            return Err(EngineError::Gguf(format!("{what} {n} is implausible")));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.count("string length")?;
        let mut buf = vec![0u8; usize::try_from(n).unwrap_or(usize::MAX)];
        self.inner.read_exact(&mut buf).map_err(|_| EngineError::Gguf("unexpected end of file in a string".into()))?;
        String::from_utf8(buf).map_err(|_| EngineError::Gguf("string is not UTF-8".into()))
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(u8::from_le_bytes(self.bytes()?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.bytes()?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.bytes()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.bytes()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.bytes()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.bytes()?)),
            7 => MetaValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => MetaValue::String(self.string()?),
            9 if depth == 0 => {
                let item_ty = self.u32()?;
                let n = self.count("array length")?;
                let mut items = Vec::with_capacity(usize::try_from(n.min(1 << 16)).unwrap_or(0));
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.bytes()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.bytes()?)),
            _ => return Err(EngineError::Gguf(format!("unknown metadata type {ty}"))),
        })
    }

    fn tensor_info(&mut self, name: &str) -> Result<TensorInfo> {
        let n_dims = self.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(EngineError::Gguf(format!("tensor `{name}` has {n_dims} dimensions")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut n_elements: u64 = 1;
        for _ in 0..n_dims {
            let d = self.u64()?;
            n_elements = n_elements
                .checked_mul(d)
                .filter(|&n| n <= self.file_len.saturating_mul(4))
                .ok_or_else(|| EngineError::Gguf(format!("tensor `{name}` is implausibly large")))?;
            dims.push(usize::try_from(d).map_err(|_| EngineError::Gguf("dimension overflow".into()))?);
        }
        let ty = self.u32()?;
        let dtype = GgmlType::from_id(ty).ok_or_else(|| EngineError::UnsupportedDtype {
            name: name.to_string(),
            dtype: match crate::quant::ggml_type_name(ty) {
                Some(known) => format!("{known} (ggml type {ty})"),
                None => format!("unknown ggml type {ty}"),
            },
        })?;
        let offset = self.u64()?;
        let n_bytes = dtype.row_bytes(dims[0]).ok_or_else(|| {
            EngineError::Gguf(format!(
                "tensor `{name}` row of {} is not a whole number of {} blocks",
                dims[0],
                dtype.name()
            ))
        })? * dims[1..].iter().product::<usize>();
        Ok(TensorInfo { dims, dtype, offset, n_bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> PathBuf {
        let path = dir.join("m.gguf");
        let mut w = GgufWriter::default();
        w.meta("general.architecture", MetaValue::String("llama".into()))
            .meta("llama.block_count", MetaValue::U32(2))
            .meta(
                "tokenizer.ggml.tokens",
                MetaValue::Array(vec![MetaValue::String("a".into()), MetaValue::String("b".into())]),
            )
            .tensor("w", &[4, 2], GgmlType::F32, (0..32).collect());
        w.write(&path).expect("write");
        path
    }

    #[test]
    fn round_trips_metadata_and_tensors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = GgufFile::open(&sample(dir.path())).expect("open");
        assert_eq!(f.metadata.str("general.architecture"), Some("llama"));
        assert_eq!(f.metadata.usize("llama.block_count"), Some(2));
        assert_eq!(f.metadata.str_array("tokenizer.ggml.tokens"), Some(vec!["a", "b"]));
        assert_eq!(f.read("w").expect("read"), (0..32).collect::<Vec<u8>>());
        assert!(matches!(f.read("nope"), Err(EngineError::MissingTensor(n)) if n == "nope"));
    }

    #[test]
    fn truncated_and_random_files_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = sample(dir.path());
        let bytes = std::fs::read(&path).expect("read");
        for cut in [0, 3, 10, 30, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).expect("write");
            assert!(GgufFile::open(&path).is_err(), "cut at {cut} parsed");
        }
        let mut seed = 0x1234_5678_u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (seed >> 56) as u8
            })
            .collect();
        std::fs::write(&path, &noise).expect("write");
        assert!(matches!(GgufFile::open(&path), Err(EngineError::Gguf(_))));
        let mut fake = b"GGUF\x03\0\0\0".to_vec();
        fake.extend_from_slice(&noise);
        std::fs::write(&path, &fake).expect("write");
        assert!(GgufFile::open(&path).is_err());
    }
}
