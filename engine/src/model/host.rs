//! Every device-to-host read the engine makes at run time goes through here, and is counted.
//!
//! On a GPU a read stalls the host until the device has finished everything queued before it, so a decode
//! step should make exactly one: the sampled token id (greedy: argmax on the device) or, when sampling, the
//! logits. The counter is per thread (the decode loop runs on one thread; tests run in parallel threads) and
//! lets a test assert that the decode loop's code path makes no other read, e.g. routing to the host.

use std::cell::Cell;

use candle_core::{Result, Tensor, WithDType};

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// Device-to-host reads made by this thread so far.
pub fn reads() -> u64 {
    READS.with(Cell::get)
}

fn count() {
    READS.with(|c| c.set(c.get() + 1));
}

/// All elements of `t` (any shape, row-major) on the host: one counted read.
pub fn read_vec<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    count();
    t.flatten_all()?.to_vec1::<T>()
}

/// The single element of `t`: one counted read.
pub fn read_scalar<T: WithDType>(t: &Tensor) -> Result<T> {
    count();
    t.flatten_all()?.squeeze(0)?.to_scalar::<T>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn counts_each_read_on_this_thread() {
        let before = reads();
        let t = Tensor::new(&[3u32, 4], &Device::Cpu).unwrap();
        assert_eq!(read_vec::<u32>(&t).unwrap(), vec![3, 4]);
        assert_eq!(read_scalar::<u32>(&t.narrow(0, 1, 1).unwrap()).unwrap(), 4);
        assert_eq!(reads() - before, 2);
        let other = std::thread::spawn(reads).join().unwrap();
        assert_eq!(other, 0, "the counter is per thread");
    }
}
