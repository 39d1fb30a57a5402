//! Thin, error-naming helpers over `hdf5` for the AnnData and loom readers.

use std::ops::Range;
use std::path::Path;

use hdf5::types::{CompoundField, CompoundType, FixedAscii, FixedUnicode, H5Type, TypeDescriptor, VarLenAscii, VarLenUnicode};
use hdf5::{Dataset, Datatype, Group, Location};

use crate::error::{DataError, Result};

/// Opens an HDF5 file read-only, telling "missing" apart from "not HDF5 / truncated".
pub fn open_file(path: &Path) -> Result<hdf5::File> {
    if !path.exists() {
        return Err(DataError::NotFound { path: path.to_path_buf() });
    }
    hdf5::File::open(path)
        .map_err(|e| DataError::NotHdf5 { path: path.to_path_buf(), reason: e.to_string() })
}

/// Wraps an `hdf5` error with the file and the field it concerned.
pub fn h5err(path: &Path, field: &str) -> impl Fn(hdf5::Error) -> DataError {
    let (path, field) = (path.to_path_buf(), field.to_string());
    move |e| DataError::Hdf5 { path: path.clone(), field: field.clone(), message: e.to_string() }
}

/// A string attribute (any HDF5 string encoding), or `None` if absent or not a string.
pub fn attr_string(loc: &Location, name: &str) -> Option<String> {
    let attr = loc.attr(name).ok()?;
    match attr.dtype().ok()?.to_descriptor().ok()? {
        TypeDescriptor::VarLenUnicode => attr.read_scalar::<VarLenUnicode>().ok().map(|s| s.to_string()),
        TypeDescriptor::VarLenAscii => attr.read_scalar::<VarLenAscii>().ok().map(|s| s.to_string()),
        TypeDescriptor::FixedAscii(_) => attr.read_scalar::<FixedAscii<1024>>().ok().map(|s| s.to_string()),
        TypeDescriptor::FixedUnicode(_) => attr.read_scalar::<FixedUnicode<1024>>().ok().map(|s| s.to_string()),
        _ => None,
    }
}

/// A 1-D string-list attribute such as AnnData's `column-order` (empty if absent).
pub fn attr_string_list(loc: &Location, name: &str) -> Vec<String> {
    let Ok(attr) = loc.attr(name) else { return Vec::new() };
    if attr.is_scalar() || attr.size() == 0 {
        return Vec::new();
    }
    if let Ok(v) = attr.read_raw::<VarLenUnicode>() {
        return v.into_iter().map(|s| s.to_string()).collect();
    }
    if let Ok(v) = attr.read_raw::<VarLenAscii>() {
        return v.into_iter().map(|s| s.to_string()).collect();
    }
    attr.read_raw::<FixedAscii<1024>>().map(|v| v.into_iter().map(|s| s.to_string()).collect()).unwrap_or_default()
}

/// An integer-list attribute such as AnnData's `shape`.
pub fn attr_u64_list(loc: &Location, name: &str) -> Option<Vec<u64>> {
    loc.attr(name).ok()?.read_raw::<i64>().ok().map(|v| v.into_iter().map(|x| x.max(0) as u64).collect())
}

/// `Some($read)` as `Vec<String>`, with `$t` the Rust type for the HDF5 string type `$desc`:
/// variable-length as stored, fixed-length into one buffer width per size class (HDF5 converts
/// fixed strings between lengths); `None` when `$desc` is not a string type.
macro_rules! read_as_strings {
    ($desc:expr, |$t:ident| $read:expr) => {{
        fn text<S: ToString>(v: Vec<S>) -> Vec<String> {
            v.into_iter().map(|s| s.to_string()).collect()
        }
        match $desc {
            TypeDescriptor::VarLenUnicode => Some({ type $t = VarLenUnicode; $read.map(text) }),
            TypeDescriptor::VarLenAscii => Some({ type $t = VarLenAscii; $read.map(text) }),
            TypeDescriptor::FixedAscii(0..=32) => Some({ type $t = FixedAscii<32>; $read.map(text) }),
            TypeDescriptor::FixedAscii(33..=256) => Some({ type $t = FixedAscii<256>; $read.map(text) }),
            TypeDescriptor::FixedAscii(_) => Some({ type $t = FixedAscii<4096>; $read.map(text) }),
            TypeDescriptor::FixedUnicode(0..=32) => Some({ type $t = FixedUnicode<32>; $read.map(text) }),
            TypeDescriptor::FixedUnicode(33..=256) => Some({ type $t = FixedUnicode<256>; $read.map(text) }),
            TypeDescriptor::FixedUnicode(_) => Some({ type $t = FixedUnicode<4096>; $read.map(text) }),
            _ => None,
        }
    }};
}

/// Reads a 1-D dataset of strings, whatever the HDF5 string flavour.
pub fn read_strings(ds: &Dataset, path: &Path, field: &str) -> Result<Vec<String>> {
    read_strings_at(ds, 0..ds.size(), path, field)
}

/// Reads the strings at `rows` of a 1-D dataset (obs is read so, a window of cells at a time).
pub fn read_strings_at(ds: &Dataset, rows: Range<usize>, path: &Path, field: &str) -> Result<Vec<String>> {
    let err = h5err(path, field);
    let desc = ds.dtype().and_then(|t| t.to_descriptor()).map_err(&err)?;
    match read_as_strings!(desc.clone(), |T| ds.read_slice_1d::<T, _>(rows.clone()).map(|a| a.to_vec())) {
        Some(out) => out.map_err(err),
        None => Err(DataError::field(path, field, format!("expected strings, found {desc:?}"))),
    }
}

/// Reads the values at `rows` of a 1-D dataset, HDF5 converting the stored type to `T`.
pub fn read_at<T: H5Type>(ds: &Dataset, rows: Range<usize>, path: &Path, field: &str) -> Result<Vec<T>> {
    ds.read_slice_1d::<T, _>(rows).map(|a| a.into_raw_vec_and_offset().0).map_err(h5err(path, field))
}

/// The fields of a compound (record) dataset, in order: anndata < 0.7 stored obs and var so.
pub fn compound_fields(ds: &Dataset) -> Option<Vec<CompoundField>> {
    match ds.dtype().and_then(|t| t.to_descriptor()) {
        Ok(TypeDescriptor::Compound(c)) => Some(c.fields),
        _ => None,
    }
}

/// Reads one field of a 1-D compound dataset as `T`, HDF5 converting the stored type (it
/// matches compound members by name, so a one-member memory type reads just that column).
pub fn read_compound_field<T: H5Type>(ds: &Dataset, member: &str, path: &Path, field: &str) -> Result<Vec<T>> {
    let err = h5err(path, field);
    let one = CompoundField { name: member.to_string(), ty: T::type_descriptor(), offset: 0, index: 0 };
    let mem = Datatype::from_descriptor(&TypeDescriptor::Compound(CompoundType { fields: vec![one], size: std::mem::size_of::<T>() }))
        .map_err(&err)?;
    let n = ds.size();
    let mut out: Vec<T> = Vec::with_capacity(n);
    let (ds_id, mem_id) = (ds.id(), mem.id());
    let buf = out.as_mut_ptr().cast();
    // SAFETY: the memory type is one member of exactly `size_of::<T>()` bytes at offset 0, laid
    // out as `T` (its own H5Type descriptor), and `out` has room for the dataset's `n` elements.
    let status = hdf5::sync::sync(|| unsafe {
        hdf5_sys::h5d::H5Dread(ds_id, mem_id, hdf5_sys::h5s::H5S_ALL, hdf5_sys::h5s::H5S_ALL, hdf5_sys::h5p::H5P_DEFAULT, buf)
    });
    if status < 0 {
        return Err(DataError::field(path, field, format!("could not read member `{member}` of the compound dataset")));
    }
    // SAFETY: H5Dread succeeded, so it wrote all `n` elements.
    unsafe { out.set_len(n) };
    Ok(out)
}

/// Reads a string member of a compound dataset, whatever its HDF5 string flavour.
pub fn read_compound_strings(ds: &Dataset, member: &str, ty: &TypeDescriptor, path: &Path, field: &str) -> Result<Vec<String>> {
    read_as_strings!(ty.clone(), |T| read_compound_field::<T>(ds, member, path, field))
        .unwrap_or_else(|| Err(DataError::field(path, field, format!("expected strings, found {ty:?}"))))
}

/// What kind of values a dataset holds, for choosing how to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Int,
    Float,
    Bool,
    String,
    Other,
}

/// Classifies a dataset's element type.
pub fn value_kind(ds: &Dataset) -> ValueKind {
    ds.dtype().and_then(|t| t.to_descriptor()).map_or(ValueKind::Other, |d| kind_of(&d))
}

/// Classifies an HDF5 element type (of a dataset, or of a compound member).
pub fn kind_of(ty: &TypeDescriptor) -> ValueKind {
    match ty {
        TypeDescriptor::Integer(_) | TypeDescriptor::Unsigned(_) => ValueKind::Int,
        TypeDescriptor::Float(_) => ValueKind::Float,
        TypeDescriptor::Boolean => ValueKind::Bool,
        TypeDescriptor::Enum(e) if e.members.len() == 2 => ValueKind::Bool,
        TypeDescriptor::VarLenUnicode | TypeDescriptor::VarLenAscii | TypeDescriptor::FixedAscii(_) | TypeDescriptor::FixedUnicode(_) => {
            ValueKind::String
        }
        _ => ValueKind::Other,
    }
}

/// A short dtype name in NumPy's words (`int32`, `float32`, `str`), for reports.
pub fn dtype_name(ds: &Dataset) -> String {
    match ds.dtype().and_then(|t| t.to_descriptor()) {
        Ok(TypeDescriptor::Integer(s)) => format!("int{}", s as usize * 8),
        Ok(TypeDescriptor::Unsigned(s)) => format!("uint{}", s as usize * 8),
        Ok(TypeDescriptor::Float(s)) => format!("float{}", s as usize * 8),
        Ok(TypeDescriptor::Boolean) | Ok(TypeDescriptor::Enum(_)) => "bool".into(),
        Ok(TypeDescriptor::VarLenUnicode | TypeDescriptor::VarLenAscii) => "str".into(),
        Ok(TypeDescriptor::FixedAscii(n) | TypeDescriptor::FixedUnicode(n)) => format!("S{n}"),
        Ok(other) => format!("{other:?}"),
        Err(_) => "unknown".into(),
    }
}

/// The dataset's compression filter, for reports ("gzip", "lzf", "none", ...).
pub fn compression_name(ds: &Dataset) -> String {
    let names: Vec<String> = ds
        .filters()
        .iter()
        .filter_map(|f| match f {
            hdf5::filters::Filter::Deflate(_) => Some("gzip".to_string()),
            hdf5::filters::Filter::LZF => Some("lzf".to_string()),
            hdf5::filters::Filter::Shuffle | hdf5::filters::Filter::Fletcher32 => None,
            other => Some(format!("{other:?}").to_lowercase()),
        })
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join("+")
    }
}

/// Opens `name` under `group` as a dataset, naming the field if it is missing.
pub fn dataset(group: &Group, name: &str, path: &Path, field: &str) -> Result<Dataset> {
    group.dataset(name).map_err(|_| DataError::field(path, field, "missing"))
}

/// Reads a whole 1-D integer dataset as `i64`.
pub fn read_i64(ds: &Dataset, path: &Path, field: &str) -> Result<Vec<i64>> {
    ds.read_raw::<i64>().map_err(h5err(path, field))
}

/// Reads a whole 1-D numeric dataset as `f64`.
pub fn read_f64(ds: &Dataset, path: &Path, field: &str) -> Result<Vec<f64>> {
    ds.read_raw::<f64>().map_err(h5err(path, field))
}

/// True if `name` is a direct child link of `group`.
pub fn has(group: &Group, name: &str) -> bool {
    group.link_exists(name)
}
