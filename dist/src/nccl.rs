//! The NCCL backend (cudarc's bindings): one process per GPU, the GPU `LOCAL_RANK`; rank
//! 0's NCCL id reaches the others through the [`Rendezvous`]. The collectives take host
//! buffers, as the trainer hands them out, and stage them through one device buffer on the
//! rank's GPU.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};

use crate::error::{Error, Result};
use crate::launch::Launch;
use crate::rendezvous::Rendezvous;
use crate::watchdog::Watchdog;
use crate::Communicator;

pub struct Nccl {
    comm: Mutex<Comm>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    local_rank: usize,
    watchdog: Watchdog,
}

// SAFETY: the NCCL communicator is used from one thread at a time (every call takes the
// lock), which is all NCCL asks of a communicator.
unsafe impl Send for Nccl {}
// SAFETY: as for Send.
unsafe impl Sync for Nccl {}

fn failed(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Backend(format!("NCCL: {what}: {e:?}"))
}

impl Nccl {
    /// Joins the run's NCCL communicator on GPU `LOCAL_RANK`.
    pub fn init(launch: &Launch, timeout: Duration) -> Result<Self> {
        let rendezvous = Rendezvous::of(launch, |name| std::env::var(name).ok())?;
        let context = CudaContext::new(launch.local_rank).map_err(|e| {
            Error::Backend(format!(
                "rank {} takes GPU {} (its local rank), which CUDA cannot open ({e:?}): start at most one rank per GPU",
                launch.rank, launch.local_rank
            ))
        })?;
        let stream = context.default_stream();
        let id = match launch.rank {
            0 => Some(Id::new().map_err(|e| failed("making the run's id", e))?),
            _ => None,
        };
        let bytes = id.map(|id| id.internal().map(|c| c as u8));
        let shared = rendezvous.share(launch.rank, launch.world, bytes, timeout)?;
        let watchdog = Watchdog::new(launch.rank, timeout);
        let comm = {
            let _watch = watchdog.watch("NCCL start-up");
            Comm::from_rank(stream.clone(), launch.rank, launch.world, Id::uninit(shared.map(|b| b as _)))
                .map_err(|e| failed("joining the ranks", e))?
        };
        rendezvous.done(launch.rank);
        let (rank, world, local_rank) = (launch.rank, launch.world, launch.local_rank);
        Ok(Self { comm: Mutex::new(comm), stream, rank, world, local_rank, watchdog })
    }

    /// Runs `f` on the communicator with `data` copied to the GPU, and copies the result
    /// back (waiting for the stream), watched as the collective `what`.
    fn staged<T: DeviceRepr + ValidAsZeroBits + NcclType>(
        &self,
        what: &'static str,
        data: &mut [T],
        f: impl FnOnce(&Comm, &mut cudarc::driver::CudaSlice<T>) -> Result<(), cudarc::nccl::result::NcclError>,
    ) -> Result<()> {
        let comm = self.comm.lock().expect("NCCL lock");
        let _watch = self.watchdog.watch(what);
        let mut buffer = self.stream.clone_htod(data).map_err(|e| failed("copying to the GPU", e))?;
        f(&comm, &mut buffer).map_err(|e| failed(what, e))?;
        self.stream.memcpy_dtoh(&buffer, data).map_err(|e| failed("copying from the GPU", e))?;
        self.stream.synchronize().map_err(|e| failed(what, e))
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        self.staged("all-reduce", data, |c, b| c.all_reduce_in_place(b, &ReduceOp::Sum).map(|_| ()))
    }
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
        self.staged("all-reduce", data, |c, b| c.all_reduce_in_place(b, &ReduceOp::Sum).map(|_| ()))
    }
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
        self.staged("broadcast", data, |c, b| c.broadcast_in_place(b, root as i32).map(|_| ()))
    }
    fn all_gather_u64(&self, data: u64) -> Result<Vec<u64>> {
        let mut all = vec![0u64; self.world];
        all[self.rank] = data;
        // Each rank's value in its own slot, zeros elsewhere: the sum is the gather.
        self.staged("all-gather", &mut all, |c, b| c.all_reduce_in_place(b, &ReduceOp::Sum).map(|_| ()))?;
        Ok(all)
    }
    fn barrier(&self) -> Result<()> {
        self.staged("barrier", &mut [0f32], |c, b| c.all_reduce_in_place(b, &ReduceOp::Sum).map(|_| ()))
    }
    fn abort(&self, code: i32) -> ! {
        // The others stop at their collective's timeout, or when the launcher sees this
        // process end (torchrun stops the rest of the group).
        std::process::exit(code)
    }
}
