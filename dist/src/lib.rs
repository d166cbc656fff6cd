//! fusellm-dist: the processes of one run and the collectives between them. A launcher
//! (`mpirun`, `srun`, `torchrun`) starts one process per device; [`join`] takes its
//! environment ([`launch`]) and returns the [`Communicator`] of the backend the devices
//! need: MPI between CPU processes, NCCL between GPUs. One process needs no backend at all: [`Single`] is rank 0 of 1 and every
//! collective is the identity, so a plain `fusellm train` runs exactly as without this
//! crate.

pub mod error;
pub mod launch;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
pub mod rendezvous;
#[cfg(any(feature = "mpi", feature = "nccl"))]
mod watchdog;

use std::time::Duration;

pub use error::{Error, Result};
pub use launch::{Launch, Launcher};

/// The variable that sets the timeout on collectives, in seconds.
pub const TIMEOUT_VAR: &str = "FUSELLM_COLLECTIVE_TIMEOUT_S";
/// The default timeout on collectives: long enough for a slow checkpoint write on rank 0.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The collectives training needs, over the ranks of one run. Every rank calls each
/// collective in the same order with buffers of the same length; a collective that waits
/// longer than the timeout stops the process (see [`TIMEOUT_VAR`]).
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The rank among the processes of this machine: which device it takes.
    fn local_rank(&self) -> usize;
    /// Sums `data` element-wise over the ranks; every rank receives the sum.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()>;
    /// As [`Communicator::all_reduce_sum`], in f64 (counts and loss parts, exactly).
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()>;
    /// Rank `root`'s `data` to every rank.
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()>;
    /// Every rank's `data`, in rank order.
    fn all_gather_u64(&self, data: u64) -> Result<Vec<u64>>;
    /// Waits until every rank is here.
    fn barrier(&self) -> Result<()>;
    /// Stops every rank of the run (this one's error has been reported by the caller).
    fn abort(&self, code: i32) -> !;
}

/// One process: rank 0 of 1.
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [f32], _: usize) -> Result<()> {
        Ok(())
    }
    fn all_gather_u64(&self, data: u64) -> Result<Vec<u64>> {
        Ok(vec![data])
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// What the ranks compute on, which decides how they talk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Devices {
    /// CPU processes: MPI, under `mpirun` or `srun`.
    Cpu,
    /// One GPU per process: NCCL, under any launcher.
    Gpu,
}

/// The communicator of this process's launch: [`Single`] for one process; for more, MPI
/// between CPU processes, NCCL between GPUs. Call it once per process (MPI is initialised
/// here and finalised when the communicator is dropped).
/// A launched GPU process of a world of one joins NCCL all the same (its collectives then
/// run on the GPU alone), so that one GPU can check the NCCL path.
pub fn join(launch: &Launch, devices: Devices) -> Result<Box<dyn Communicator>> {
    if launch.world == 1 && (devices == Devices::Cpu || launch.launcher == Launcher::None) {
        return Ok(Box::new(Single));
    }
    let timeout = timeout()?;
    match (devices, launch.launcher) {
        (Devices::Gpu, _) => nccl_backend(launch, timeout),
        (Devices::Cpu, Launcher::Mpi | Launcher::Slurm) => mpi_backend(launch, timeout),
        (Devices::Cpu, Launcher::Torchrun) => Err(Error::Backend(format!(
            "a torchrun-style launch of {} CPU ranks: fusellm's CPU ranks talk over MPI; start them with mpirun or srun, or train on GPUs (device = \"cuda\"), whose ranks meet over NCCL",
            launch.world
        ))),
        (Devices::Cpu, Launcher::None) => unreachable!("a plain process is rank 0 of 1"),
    }
}

#[cfg(feature = "nccl")]
fn nccl_backend(launch: &Launch, timeout: Duration) -> Result<Box<dyn Communicator>> {
    Ok(Box::new(nccl::Nccl::init(launch, timeout)?))
}

#[cfg(not(feature = "nccl"))]
fn nccl_backend(launch: &Launch, _timeout: Duration) -> Result<Box<dyn Communicator>> {
    Err(Error::Backend(format!(
        "{} started {} ranks on GPUs, which talk over NCCL, but this fusellm was built without CUDA; rebuild it with `--features cuda` (scripts/cuda-build.sh)",
        launch.launcher.name(),
        launch.world
    )))
}

#[cfg(feature = "mpi")]
fn mpi_backend(launch: &Launch, timeout: Duration) -> Result<Box<dyn Communicator>> {
    Ok(Box::new(mpi::Mpi::init(launch, timeout)?))
}

#[cfg(not(feature = "mpi"))]
fn mpi_backend(launch: &Launch, _timeout: Duration) -> Result<Box<dyn Communicator>> {
    Err(Error::Backend(format!(
        "{} started {} ranks, but this fusellm was built without MPI; rebuild it with `--features mpi` (OpenMPI's libopenmpi-dev and libclang-dev installed)",
        launch.launcher.name(),
        launch.world
    )))
}

/// The timeout on collectives: [`TIMEOUT_VAR`] or the default.
fn timeout() -> Result<Duration> {
    match std::env::var(TIMEOUT_VAR) {
        Ok(text) => text
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| Error::Launch(format!("{TIMEOUT_VAR}={text}: expected a positive number of seconds"))),
        Err(_) => Ok(DEFAULT_TIMEOUT),
    }
}
