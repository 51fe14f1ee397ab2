//! The element types torch writes.

use candle_core::DType;

/// Element types torch writes, with what candle calls them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TorchDType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    F8E4M3,
    U16,
    U32,
    /// A dtype candle has no equivalent for; its torch name and element size.
    Other(&'static str, usize),
}

impl TorchDType {
    pub(super) fn size(self) -> usize {
        match self {
            TorchDType::F64 | TorchDType::I64 => 8,
            TorchDType::F32 | TorchDType::I32 | TorchDType::U32 => 4,
            TorchDType::F16 | TorchDType::BF16 | TorchDType::I16 | TorchDType::U16 => 2,
            TorchDType::I8 | TorchDType::U8 | TorchDType::Bool | TorchDType::F8E4M3 => 1,
            TorchDType::Other(_, size) => size,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            TorchDType::F64 => "float64",
            TorchDType::F32 => "float32",
            TorchDType::F16 => "float16",
            TorchDType::BF16 => "bfloat16",
            TorchDType::I64 => "int64",
            TorchDType::I32 => "int32",
            TorchDType::I16 => "int16",
            TorchDType::I8 => "int8",
            TorchDType::U8 => "uint8",
            TorchDType::Bool => "bool",
            TorchDType::F8E4M3 => "float8_e4m3fn",
            TorchDType::U16 => "uint16",
            TorchDType::U32 => "uint32",
            TorchDType::Other(name, _) => name,
        }
    }

    /// The dtype `load` produces.
    pub(super) fn candle(self) -> Option<DType> {
        Some(match self {
            TorchDType::F64 => DType::F64,
            TorchDType::F32 => DType::F32,
            TorchDType::F16 => DType::F16,
            TorchDType::BF16 => DType::BF16,
            TorchDType::I64 => DType::I64,
            TorchDType::I32 => DType::I32,
            TorchDType::I16 | TorchDType::I8 => DType::I16,
            TorchDType::U8 | TorchDType::Bool => DType::U8,
            TorchDType::F8E4M3 => DType::F8E4M3,
            TorchDType::U16 | TorchDType::U32 => DType::U32,
            TorchDType::Other(..) => return None,
        })
    }

    /// A `torch.<name>` dtype global.
    pub(super) fn from_torch_name(name: &str) -> Option<TorchDType> {
        Some(match name {
            "float64" | "double" => TorchDType::F64,
            "float32" | "float" => TorchDType::F32,
            "float16" | "half" => TorchDType::F16,
            "bfloat16" => TorchDType::BF16,
            "int64" | "long" => TorchDType::I64,
            "int32" | "int" => TorchDType::I32,
            "int16" | "short" => TorchDType::I16,
            "int8" => TorchDType::I8,
            "uint8" => TorchDType::U8,
            "bool" => TorchDType::Bool,
            "float8_e4m3fn" => TorchDType::F8E4M3,
            "uint16" => TorchDType::U16,
            "uint32" => TorchDType::U32,
            "uint64" => TorchDType::Other("uint64", 8),
            "float8_e5m2" => TorchDType::Other("float8_e5m2", 1),
            "float8_e4m3fnuz" => TorchDType::Other("float8_e4m3fnuz", 1),
            "float8_e5m2fnuz" => TorchDType::Other("float8_e5m2fnuz", 1),
            "float8_e8m0fnu" => TorchDType::Other("float8_e8m0fnu", 1),
            "float4_e2m1fn_x2" => TorchDType::Other("float4_e2m1fn_x2", 1),
            "complex32" | "chalf" => TorchDType::Other("complex32", 4),
            "complex64" | "cfloat" => TorchDType::Other("complex64", 8),
            "complex128" | "cdouble" => TorchDType::Other("complex128", 16),
            "bits8" => TorchDType::Other("bits8", 1),
            "bits16" => TorchDType::Other("bits16", 2),
            "bits1x8" => TorchDType::Other("bits1x8", 1),
            "bits2x4" => TorchDType::Other("bits2x4", 1),
            "bits4x2" => TorchDType::Other("bits4x2", 1),
            _ => return None,
        })
    }

    /// A legacy `torch.<Name>Storage` class, the storage type of `_rebuild_tensor_v2`.
    pub(super) fn from_storage_name(name: &str) -> Option<TorchDType> {
        Some(match name {
            "DoubleStorage" => TorchDType::F64,
            "FloatStorage" => TorchDType::F32,
            "HalfStorage" => TorchDType::F16,
            "BFloat16Storage" => TorchDType::BF16,
            "LongStorage" => TorchDType::I64,
            "IntStorage" => TorchDType::I32,
            "ShortStorage" => TorchDType::I16,
            "CharStorage" => TorchDType::I8,
            "ByteStorage" => TorchDType::U8,
            "BoolStorage" => TorchDType::Bool,
            "ComplexFloatStorage" => TorchDType::Other("complex64", 8),
            "ComplexDoubleStorage" => TorchDType::Other("complex128", 16),
            "QInt8Storage" => TorchDType::Other("qint8", 1),
            "QUInt8Storage" => TorchDType::Other("quint8", 1),
            "QInt32Storage" => TorchDType::Other("qint32", 4),
            "QUInt4x2Storage" => TorchDType::Other("quint4x2", 1),
            "QUInt2x4Storage" => TorchDType::Other("quint2x4", 1),
            _ => return None,
        })
    }
}
