//! Where weights come from.
//!
//! A model asks a [`Weights`] handle for each parameter by name and shape.
//! The handle forwards to a [`WeightSource`]: a safetensors file or folder,
//! a GGUF file (in `attn-models`), or a [`ParamStore`] that creates freshly
//! initialised, trainable parameters. Loading never guesses: a missing tensor
//! or a wrong shape is an error that names the tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};

/// How a parameter is initialised when a trainable source has no value for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    /// Normal(0, std).
    Normal {
        std: f64,
    },
    /// Uniform(-bound, bound).
    Uniform {
        bound: f64,
    },
}

impl Init {
    /// Xavier/Glorot uniform for a `[fan_out, fan_in]` matrix, as PyTorch's
    /// `nn.Transformer` uses.
    pub fn xavier_uniform(fan_out: usize, fan_in: usize) -> Self {
        Init::Uniform { bound: (6.0 / (fan_in + fan_out) as f64).sqrt() }
    }

    pub fn create(&self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let t = match *self {
            Init::Zeros => Tensor::zeros(shape, dtype, device)?,
            Init::Ones => Tensor::ones(shape, dtype, device)?,
            // Drawn from attn's seeded stream (candle's CPU RNG cannot be seeded).
            Init::Normal { std } => {
                let n = shape.iter().product();
                Tensor::from_vec(crate::rng::normal(n, 0.0, std as f32), shape, device)?.to_dtype(dtype)?
            }
            Init::Uniform { bound } => {
                let n = shape.iter().product();
                let v = crate::rng::uniform_range(n, -bound as f32, bound as f32);
                Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?
            }
        };
        Ok(t)
    }
}

/// A store of named tensors a model can be built from.
pub trait WeightSource: Send + Sync {
    /// Returns the tensor called `name` with exactly `shape`, converted to
    /// `dtype` on `device`. Sources that create parameters (training) use
    /// `init` when the name is new; file-backed sources ignore it and return
    /// [`Error::MissingTensor`].
    fn load(&self, name: &str, shape: &[usize], init: Init, dtype: DType, device: &Device) -> Result<Tensor>;

    /// Whether the source holds a tensor called `name`.
    fn contains(&self, name: &str) -> bool;

    /// The tensor `name` in its quantized block format, when the source
    /// stores it quantized (a GGUF file): layers that can compute on it
    /// (see [`crate::Linear::load`]) keep it so. `None` for float sources.
    fn load_quantized(&self, _name: &str, _device: &Device) -> Result<Option<Arc<QTensor>>> {
        Ok(None)
    }
}

/// Checks that a loaded tensor has the expected shape.
pub fn check_shape(name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(Error::TensorShape { name: name.to_string(), expected: expected.to_vec(), got: t.dims().to_vec() });
    }
    Ok(())
}

/// A handle on a weight source with a name prefix, a dtype and a device.
/// `w.pp("layers").pp(0).get(&[d, d], "weight")` asks for `layers.0.weight`.
#[derive(Clone)]
pub struct Weights {
    source: Arc<dyn WeightSource>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl Weights {
    pub fn new(source: Arc<dyn WeightSource>, dtype: DType, device: &Device) -> Self {
        Weights { source, prefix: String::new(), dtype, device: device.clone() }
    }

    /// Loads every tensor from safetensors files (memory-mapped).
    pub fn from_safetensors<P: AsRef<Path>>(paths: &[P], dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self::new(Arc::new(SafetensorsSource::open(paths)?), dtype, device))
    }

    /// A handle one level deeper in the name hierarchy.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let mut w = self.clone();
        w.prefix = self.path(&name.to_string());
        w
    }

    /// The full name of `name` under this handle's prefix.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        self.get_with_init(shape, name, Init::Normal { std: 0.02 })
    }

    pub fn get_with_init(&self, shape: &[usize], name: &str, init: Init) -> Result<Tensor> {
        let full = self.path(name);
        let t = self.source.load(&full, shape, init, self.dtype, &self.device)?;
        check_shape(&full, &t, shape)?;
        Ok(t)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.source.contains(&self.path(name))
    }

    /// `name` in the source's quantized format, if it stores it quantized;
    /// the shape is checked like [`Weights::get`].
    pub fn get_quantized(&self, shape: &[usize], name: &str) -> Result<Option<Arc<QTensor>>> {
        let full = self.path(name);
        let Some(q) = self.source.load_quantized(&full, &self.device)? else { return Ok(None) };
        if q.shape().dims() != shape {
            return Err(Error::TensorShape { name: full, expected: shape.to_vec(), got: q.shape().dims().to_vec() });
        }
        Ok(Some(q))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn source(&self) -> &Arc<dyn WeightSource> {
        &self.source
    }
}

/// Tensors from one or more safetensors files, memory-mapped.
pub struct SafetensorsSource {
    inner: candle_core::safetensors::MmapedSafetensors,
    names: HashMap<String, PathBuf>,
}

impl SafetensorsSource {
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let mut names = HashMap::new();
        let mut owned = Vec::new();
        for p in paths {
            let p = p.as_ref();
            let file = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
            // SAFETY: the file is opened read-only; like every mmap-based
            // loader we rely on nobody truncating it while it is mapped.
            let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(p, e))?;
            let st = safetensors::SafeTensors::deserialize(&mmap)
                .map_err(|e| Error::format(p, format!("not a valid safetensors file: {e}")))?;
            for name in st.names() {
                names.insert(name.to_string(), p.to_path_buf());
            }
            owned.push(p.to_path_buf());
        }
        // SAFETY: as above; every file was validated by the parse just done.
        let inner = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&owned) }
            .map_err(|e| Error::format(owned.first().cloned().unwrap_or_default(), e.to_string()))?;
        Ok(SafetensorsSource { inner, names })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.names.keys()
    }

    /// Loads a tensor as stored (its own dtype and shape).
    pub fn load_raw(&self, name: &str, device: &Device) -> Result<Tensor> {
        let Some(path) = self.names.get(name) else {
            return Err(Error::MissingTensor { name: name.to_string() });
        };
        self.inner.load(name, device).map_err(|e| Error::format(path, format!("tensor `{name}`: {e}")))
    }
}

impl WeightSource for SafetensorsSource {
    fn load(&self, name: &str, shape: &[usize], _init: Init, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.load_raw(name, device)?;
        check_shape(name, &t, shape)?;
        Ok(t.to_dtype(dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }
}

/// Trainable parameters by name. A name seen for the first time is loaded
/// from the optional `base` source (fine-tuning, resuming) or, failing that,
/// created with its [`Init`]. Every tensor handed out is a [`Var`], so
/// gradients reach it.
pub struct ParamStore {
    vars: Mutex<Vec<(String, Var)>>,
    base: Option<Arc<dyn WeightSource>>,
}

impl ParamStore {
    pub fn new() -> Self {
        ParamStore { vars: Mutex::new(Vec::new()), base: None }
    }

    /// Parameters start from the tensors in `base` where it has them.
    pub fn from_source(base: Arc<dyn WeightSource>) -> Self {
        ParamStore { vars: Mutex::new(Vec::new()), base: Some(base) }
    }

    /// All parameters in the order they were first requested.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.lock().clone()
    }

    pub fn get(&self, name: &str) -> Option<Var> {
        self.lock().iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Var)>> {
        // A poisoned lock only means another thread panicked mid-push; the
        // vector itself is still valid.
        self.vars.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for ParamStore {
    fn default() -> Self {
        Self::new()
    }
}

impl WeightSource for ParamStore {
    /// Parameters are kept in float32 (the master copy the optimiser
    /// updates); a request for another dtype (mixed precision) gets a
    /// differentiable cast of the float32 variable, so gradients still
    /// reach it.
    fn load(&self, name: &str, shape: &[usize], init: Init, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut vars = self.lock();
        let var = match vars.iter().find(|(n, _)| n == name) {
            Some((_, v)) => {
                check_shape(name, v.as_tensor(), shape)?;
                v.clone()
            }
            None => {
                let t = match &self.base {
                    Some(base) if base.contains(name) => base.load(name, shape, init, DType::F32, device)?,
                    _ => init.create(shape, DType::F32, device)?,
                };
                let var = Var::from_tensor(&t)?;
                vars.push((name.to_string(), var.clone()));
                var
            }
        };
        if dtype == DType::F32 {
            Ok(var.as_tensor().clone())
        } else {
            Ok(var.as_tensor().to_dtype(dtype)?)
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.lock().iter().any(|(n, _)| n == name) || self.base.as_ref().is_some_and(|b| b.contains(name))
    }
}
