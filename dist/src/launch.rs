//! Who started this process and where it stands among its peers, read from the environment
//! each launcher sets: `mpirun` (OpenMPI, or MPICH's Hydra), `srun` (Slurm) and `torchrun`
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). No launcher: one
//! process, rank 0 of 1.

use crate::error::{Error, Result};

/// The launcher whose environment was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher: a plain process.
    None,
    /// `mpirun`/`mpiexec` of OpenMPI (`OMPI_COMM_WORLD_*`) or MPICH (`PMI_*`).
    Mpi,
    /// Slurm's `srun` (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`: a batch script outside any
    /// `srun` step also sees `SLURM_PROCID`, and is one plain process).
    Slurm,
    /// `torchrun` and the launchers that copy its variables.
    Torchrun,
}

impl Launcher {
    pub fn name(self) -> &'static str {
        match self {
            Launcher::None => "none",
            Launcher::Mpi => "mpirun",
            Launcher::Slurm => "srun",
            Launcher::Torchrun => "torchrun",
        }
    }
}

/// This process's place in the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub launcher: Launcher,
    pub rank: usize,
    pub world: usize,
    /// The rank among the processes of this machine: which device it takes.
    pub local_rank: usize,
    /// `MASTER_ADDR:MASTER_PORT`, where torchrun-style launches meet.
    pub master: Option<String>,
}

/// The variables of each launcher: rank, world size, local rank.
const VARIABLES: [(Launcher, [&str; 3]); 4] = [
    (Launcher::Mpi, ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"]),
    (Launcher::Mpi, ["PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"]),
    (Launcher::Torchrun, ["RANK", "WORLD_SIZE", "LOCAL_RANK"]),
    (Launcher::Slurm, ["SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"]),
];

impl Launch {
    /// A plain process.
    pub fn single() -> Self {
        Self { launcher: Launcher::None, rank: 0, world: 1, local_rank: 0, master: None }
    }

    /// This process's launch, from its environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The launch that the variables `var` describe. The first launcher whose rank variable
    /// is set wins, in the order mpirun, torchrun, srun (an `mpirun` or `torchrun` inside a
    /// Slurm allocation also sees Slurm's variables).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let launched = |(launcher, [rank, world, _]): &(Launcher, [&str; 3])| {
            var(rank).is_some() && (*launcher != Launcher::Slurm || var(world).is_some())
        };
        let Some((launcher, [rank_var, world_var, local_var])) = VARIABLES.into_iter().find(launched) else {
            return Ok(Self::single());
        };
        let number = |name: &str, required: bool| -> Result<Option<usize>> {
            match var(name) {
                Some(text) => text.trim().parse().map(Some).map_err(|_| {
                    Error::Launch(format!("{name}={text} is not a number; the {} launch is malformed", launcher.name()))
                }),
                None if required => Err(Error::Launch(format!(
                    "{rank_var} is set but {name} is not; start every rank through {} (or set both)",
                    launcher.name()
                ))),
                None => Ok(None),
            }
        };
        let rank = number(rank_var, true)?.expect("required");
        let world = number(world_var, true)?.expect("required");
        if world == 0 || rank >= world {
            return Err(Error::Launch(format!(
                "{rank_var}={rank} and {world_var}={world}: a rank must be below the world size"
            )));
        }
        let local_rank = number(local_var, false)?.unwrap_or(0);
        let master = match launcher {
            Launcher::Torchrun if world > 1 => Some(master(&var)?),
            _ => None,
        };
        Ok(Self { launcher, rank, world, local_rank, master })
    }
}

/// `MASTER_ADDR:MASTER_PORT`, both required.
fn master(var: &impl Fn(&str) -> Option<String>) -> Result<String> {
    let missing = |name: &str| {
        Error::Launch(format!(
            "RANK and WORLD_SIZE are set but {name} is not: torchrun-style launches meet at MASTER_ADDR:MASTER_PORT; set both on every rank"
        ))
    };
    let addr = var("MASTER_ADDR").filter(|a| !a.is_empty()).ok_or_else(|| missing("MASTER_ADDR"))?;
    let port = var("MASTER_PORT").ok_or_else(|| missing("MASTER_PORT"))?;
    port.parse::<u16>().map_err(|_| Error::Launch(format!("MASTER_PORT={port} is not a port number (1 to 65535)")))?;
    Ok(format!("{addr}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch> {
        Launch::from_vars(|name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn each_launcher_is_read() {
        assert_eq!(launch(&[]).unwrap(), Launch::single());
        let mpi = launch(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2")]).unwrap();
        assert_eq!((mpi.launcher, mpi.rank, mpi.world, mpi.local_rank), (Launcher::Mpi, 1, 2, 0));
        let slurm = launch(&[("SLURM_PROCID", "3"), ("SLURM_STEP_NUM_TASKS", "4"), ("SLURM_LOCALID", "1")]).unwrap();
        assert_eq!((slurm.launcher, slurm.rank, slurm.world, slurm.local_rank), (Launcher::Slurm, 3, 4, 1));
        let torch = [("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "node1"), ("MASTER_PORT", "29500")];
        let torch = launch(&torch).unwrap();
        assert_eq!((torch.launcher, torch.master.as_deref()), (Launcher::Torchrun, Some("node1:29500")));
        // mpirun inside a Slurm allocation is an MPI launch; a batch script outside an srun
        // step is one process.
        let both = launch(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("PMI_RANK", "1"), ("PMI_SIZE", "2")]);
        assert_eq!(both.unwrap().launcher, Launcher::Mpi);
        assert_eq!(launch(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")]).unwrap(), Launch::single());
    }

    #[test]
    fn an_inconsistent_launch_is_an_error() {
        let error = |vars: &[(&str, &str)]| launch(vars).unwrap_err().to_string();
        assert!(error(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("RANK=2 and WORLD_SIZE=2"));
        assert!(error(&[("RANK", "0")]).contains("RANK is set but WORLD_SIZE is not"));
        assert!(error(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("MASTER_ADDR is not"));
        let port = [("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "x")];
        assert!(error(&port).contains("MASTER_PORT=x is not a port"));
        let slurm = [("SLURM_PROCID", "one"), ("SLURM_STEP_NUM_TASKS", "2")];
        assert!(error(&slurm).contains("SLURM_PROCID=one is not a number"));
    }
}
