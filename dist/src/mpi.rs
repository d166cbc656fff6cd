//! The MPI backend (rsmpi over the system's MPI): CPU processes under `mpirun` or `srun`.

use std::sync::Mutex;
use std::time::Duration;

use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::topology::Communicator as _;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;

use crate::error::{Error, Result};
use crate::launch::Launch;
use crate::watchdog::Watchdog;
use crate::Communicator;

/// `MPI_COMM_WORLD`, its calls serialised by a lock.
pub struct Mpi {
    world: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    local_rank: usize,
    watchdog: Watchdog,
    /// Finalises MPI when dropped (after `world`, declared above it).
    _universe: Universe,
}

// SAFETY: MPI is initialised with MPI_THREAD_SERIALIZED (checked in `init`): calls may come
// from any thread as long as no two run at once, which the lock around `world` ensures.
unsafe impl Send for Mpi {}
// SAFETY: as for Send; every method goes through the lock.
unsafe impl Sync for Mpi {}

impl Mpi {
    /// Initialises MPI and checks that it sees the ranks the launcher's environment says.
    pub fn init(launch: &Launch, timeout: Duration) -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| Error::Backend("MPI was initialised twice in one process".into()))?;
        if threading < Threading::Serialized {
            return Err(Error::Backend(format!(
                "this MPI offers {threading:?} threading, and fusellm needs Serialized (calls from the training threads); use an MPI built with thread support"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if (rank, size) != (launch.rank, launch.world) {
            return Err(Error::Launch(format!(
                "the launcher's environment says rank {} of {}, MPI says rank {rank} of {size}; start fusellm with the MPI it was built against",
                launch.rank, launch.world
            )));
        }
        let watchdog = Watchdog::new(rank, timeout);
        let local_rank = launch.local_rank;
        Ok(Self { world: Mutex::new(world), rank, size, local_rank, watchdog, _universe: universe })
    }

    /// Runs `f` on the world communicator, watched as the collective `what`.
    fn call<T>(&self, what: &'static str, f: impl FnOnce(&SimpleCommunicator) -> T) -> T {
        let world = self.world.lock().expect("MPI lock");
        let _watch = self.watchdog.watch(what);
        f(&world)
    }
}

impl Mpi {
    /// Sums `data` over the ranks, piece by piece.
    fn sum<T: Equivalence + Clone>(&self, data: &mut [T]) -> Result<()> {
        for piece in data.chunks_mut(PIECE) {
            let send = piece.to_vec();
            self.call("all-reduce", |w| w.all_reduce_into(&send[..], piece, SystemOperation::sum()));
        }
        Ok(())
    }
}

/// MPI counts are C ints: buffers are cut into pieces that fit.
const PIECE: usize = 1 << 28;

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.size
    }

    fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        self.sum(data)
    }

    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
        self.sum(data)
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
        for piece in data.chunks_mut(PIECE) {
            self.call("broadcast", |w| w.process_at_rank(root as i32).broadcast_into(piece));
        }
        Ok(())
    }

    fn all_gather_u64(&self, data: u64) -> Result<Vec<u64>> {
        let mut out = vec![0u64; self.size];
        self.call("all-gather", |w| w.all_gather_into(&data, &mut out[..]));
        Ok(out)
    }

    fn barrier(&self) -> Result<()> {
        self.call("barrier", |w| w.barrier());
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        // Not through the lock: a rank that fails may hold it in another thread.
        SimpleCommunicator::world().abort(code)
    }
}
