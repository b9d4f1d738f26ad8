//! The launch plan as data: buffers, arguments, launches and the builder the launchers use. The
//! executors ([`super::Plan::run`]: CUDA, and the CPU emulator) read it; it depends on neither.

use candle_core::{DType, Shape};

/// A buffer a kernel argument points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buf {
    /// The i-th input tensor (made contiguous).
    In(usize),
    /// The i-th output, allocated by the executor (poisoned when [`crate::poison_outputs`] is on).
    Out(usize),
    /// The i-th scratch buffer, allocated for the duration of the plan.
    Tmp(usize),
    /// The i-th table of u32s the host computed, uploaded before the first launch.
    Upload(usize),
}

/// One kernel argument, in the kernel's parameter order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    Buf(Buf),
    /// A null pointer (an optional input that is absent).
    Null,
    U32(u32),
    F32(f32),
}

/// One kernel launch.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// File stem of the `.cu` source, e.g. `"rms_norm"`.
    pub module: &'static str,
    /// The `extern "C"` entry point, e.g. `"rms_norm_bf16"`.
    pub entry: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub args: Vec<Arg>,
}

/// A buffer the executor allocates: an output (returned as a tensor of `shape`) or a scratch buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Alloc {
    pub name: &'static str,
    pub dtype: DType,
    pub shape: Shape,
}

impl Alloc {
    pub fn new(name: &'static str, dtype: DType, shape: impl Into<Shape>) -> Self {
        Alloc {
            name,
            dtype,
            shape: shape.into(),
        }
    }
}

/// Everything one op launches.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub op: &'static str,
    /// Names of the input tensors, in the order [`Plan::run`] takes them.
    pub inputs: Vec<&'static str>,
    pub outs: Vec<Alloc>,
    pub tmps: Vec<Alloc>,
    pub uploads: Vec<(&'static str, Vec<u32>)>,
    pub launches: Vec<Launch>,
    /// Inputs the kernels write in place (a KV cache): they must be contiguous, and the emulator
    /// leaves them writable and copies them back into the caller's tensor.
    pub writes: Vec<usize>,
}

impl Plan {
    pub fn new(op: &'static str, inputs: &[&'static str]) -> Self {
        Plan {
            op,
            inputs: inputs.to_vec(),
            outs: Vec::new(),
            tmps: Vec::new(),
            uploads: Vec::new(),
            launches: Vec::new(),
            writes: Vec::new(),
        }
    }

    /// Adds an output; returns its argument.
    pub fn out(&mut self, name: &'static str, dtype: DType, shape: impl Into<Shape>) -> Arg {
        self.outs.push(Alloc::new(name, dtype, shape));
        Arg::Buf(Buf::Out(self.outs.len() - 1))
    }

    /// Marks input `i` as written in place by the kernels.
    pub fn write_in_place(&mut self, i: usize) {
        self.writes.push(i);
    }

    /// Adds a scratch buffer of `len` elements; returns its argument.
    pub fn tmp(&mut self, name: &'static str, dtype: DType, len: usize) -> Arg {
        self.tmps.push(Alloc::new(name, dtype, len));
        Arg::Buf(Buf::Tmp(self.tmps.len() - 1))
    }

    /// Adds a host-computed u32 table; returns its argument.
    pub fn upload(&mut self, name: &'static str, data: Vec<u32>) -> Arg {
        self.uploads.push((name, data));
        Arg::Buf(Buf::Upload(self.uploads.len() - 1))
    }

    /// Adds a launch unless its grid is empty (CUDA rejects a zero grid dimension).
    pub fn launch(
        &mut self,
        module: &'static str,
        entry: String,
        grid: [u32; 3],
        block: [u32; 3],
        args: Vec<Arg>,
    ) {
        if grid.iter().all(|&g| g > 0) {
            self.launches.push(Launch {
                module,
                entry,
                grid,
                block,
                args,
            });
        }
    }

    /// The name of a buffer argument, for error messages.
    pub fn buf_name(&self, b: Buf) -> &'static str {
        match b {
            Buf::In(i) => self.inputs.get(i).copied().unwrap_or("?"),
            Buf::Out(i) => self.outs.get(i).map_or("?", |a| a.name),
            Buf::Tmp(i) => self.tmps.get(i).map_or("?", |a| a.name),
            Buf::Upload(i) => self.uploads.get(i).map_or("?", |u| u.0),
        }
    }
}

/// Appends the step table to a plan's `inputs` when its launches read one (`step = Some(row)`):
/// the table's kernel argument (a null pointer without one) and the row to pass beside it.
pub fn step_input(inputs: &mut Vec<&'static str>, step: Option<u32>) -> (Arg, u32) {
    match step {
        Some(row) => {
            inputs.push("step");
            (Arg::Buf(Buf::In(inputs.len() - 1)), row)
        }
        None => (Arg::Null, 0),
    }
}
