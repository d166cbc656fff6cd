//! How the ranks of an NCCL run learn rank 0's NCCL id (128 bytes) before they can form a
//! communicator: over TCP, rank 0 serving it at `MASTER_ADDR` on [`RENDEZVOUS_PORT_VAR`] or
//! `MASTER_PORT + 1` (`MASTER_PORT` itself is torchrun's own store), or through a file on a
//! file system every rank sees ([`ID_FILE_VAR`]). The message carries the world size, so a
//! rank that meets another run's rank 0 says so instead of joining it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::launch::Launch;

/// A file through which rank 0 hands out the id (instead of TCP).
pub const ID_FILE_VAR: &str = "FUSELLM_NCCL_ID_FILE";
/// The port rank 0 serves the id on (default: `MASTER_PORT + 1`).
pub const RENDEZVOUS_PORT_VAR: &str = "FUSELLM_RENDEZVOUS_PORT";

/// The id's bytes, as NCCL's `ncclUniqueId` holds them.
pub type Id = [u8; 128];

const MAGIC: &[u8; 8] = b"fusellm1";

/// Where the ranks meet.
#[derive(Clone, Debug, PartialEq)]
pub enum Rendezvous {
    Tcp { addr: String, port: u16 },
    File(PathBuf),
}

impl Rendezvous {
    /// The rendezvous of `launch`: the id file when [`ID_FILE_VAR`] is set, else TCP at
    /// `MASTER_ADDR`.
    pub fn of(launch: &Launch, var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        if let Some(file) = var(ID_FILE_VAR).filter(|f| !f.is_empty()) {
            return Ok(Self::File(file.into()));
        }
        let master = launch
            .master
            .clone()
            .or_else(|| Some(format!("{}:{}", var("MASTER_ADDR").filter(|a| !a.is_empty())?, var("MASTER_PORT")?)));
        let Some(master) = master else {
            return Err(Error::Launch(format!(
                "the NCCL ranks of this {} launch have nowhere to meet: export MASTER_ADDR and MASTER_PORT (rank 0's host and a free port) to every rank, or {ID_FILE_VAR} (a path on a file system every rank sees)",
                launch.launcher.name()
            )));
        };
        let (addr, port) = master.rsplit_once(':').expect("MASTER_ADDR:MASTER_PORT");
        let port =
            match var(RENDEZVOUS_PORT_VAR) {
                Some(p) => p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| {
                    Error::Launch(format!("{RENDEZVOUS_PORT_VAR}={p} is not a port number (1 to 65535)"))
                })?,
                None => port.parse::<u16>().ok().and_then(|p| p.checked_add(1)).ok_or_else(|| {
                    Error::Launch(format!("MASTER_PORT={port} leaves no port above it; set {RENDEZVOUS_PORT_VAR}"))
                })?,
            };
        Ok(Self::Tcp { addr: addr.to_owned(), port })
    }

    /// Rank 0: hands `id` to the other `world - 1` ranks (waiting for them at most
    /// `timeout`). The others: rank 0's id.
    pub fn share(&self, rank: usize, world: usize, id: Option<Id>, timeout: Duration) -> Result<Id> {
        match (self, id) {
            (Self::Tcp { port, .. }, Some(id)) if rank == 0 => serve(*port, world, &id, timeout).map(|_| id),
            (Self::Tcp { addr, port }, None) if rank > 0 => fetch(addr, *port, world, timeout),
            (Self::File(path), Some(id)) if rank == 0 => write_file(path, world, &id).map(|_| id),
            (Self::File(path), None) if rank > 0 => read_file(path, world, timeout),
            _ => unreachable!("rank 0 alone brings the id"),
        }
    }

    /// Rank 0, once every rank has joined: removes the id file, so that a later run does
    /// not read this one's id.
    pub fn done(&self, rank: usize) {
        if let (Self::File(path), 0) = (self, rank) {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn message(world: usize, id: &Id) -> Vec<u8> {
    [&MAGIC[..], &(world as u64).to_le_bytes(), id].concat()
}

/// The id in `bytes`, checked to come from a run of `world` ranks.
fn parse(bytes: &[u8], world: usize, from: &str) -> Result<Id> {
    let wrong = |what: String| Error::Launch(format!("{from}: {what}"));
    if bytes.len() != 8 + 8 + 128 || &bytes[..8] != MAGIC {
        return Err(wrong("this is not a fusellm NCCL id (another program, or a file cut short)".into()));
    }
    let theirs = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
    if theirs != world {
        return Err(wrong(format!(
            "rank 0 there runs {theirs} ranks, this rank was started as one of {world}: is it another run's?"
        )));
    }
    Ok(bytes[16..].try_into().expect("128 bytes"))
}

fn serve(port: u16, world: usize, id: &Id, timeout: Duration) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
        Error::Launch(format!(
            "rank 0 cannot listen on port {port} for the other ranks: {e}; choose another with {RENDEZVOUS_PORT_VAR}"
        ))
    })?;
    listener.set_nonblocking(true).map_err(|e| Error::Launch(format!("port {port}: {e}")))?;
    let (deadline, message) = (Instant::now() + timeout, message(world, id));
    let mut served = 1;
    while served < world {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                stream.write_all(&message).map_err(|e| Error::Launch(format!("sending the NCCL id: {e}")))?;
                served += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(Error::Launch(format!(
                    "rank 0 waited {:.0} s on port {port} and {} of the {} other ranks came: did they start, and can they reach this host?",
                    timeout.as_secs_f64(),
                    served - 1,
                    world - 1
                )))
            }
            Err(e) => return Err(Error::Launch(format!("port {port}: {e}"))),
        }
    }
    Ok(())
}

fn fetch(addr: &str, port: u16, world: usize, timeout: Duration) -> Result<Id> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect((addr, port)) {
            Ok(mut stream) => {
                let mut bytes = Vec::new();
                stream.set_read_timeout(Some(timeout)).ok();
                stream.read_to_end(&mut bytes).map_err(|e| Error::Launch(format!("{addr}:{port}: {e}")))?;
                return parse(&bytes, world, &format!("{addr}:{port}"));
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                return Err(Error::Launch(format!(
                    "rank 0 did not answer at {addr}:{port} within {:.0} s ({e}): is MASTER_ADDR its host, and did it start?",
                    timeout.as_secs_f64()
                )))
            }
        }
    }
}

fn write_file(path: &std::path::Path, world: usize, id: &Id) -> Result<()> {
    let partial = path.with_extension("partial");
    let failed = |e: std::io::Error| Error::Launch(format!("writing the NCCL id to {}: {e}", path.display()));
    std::fs::write(&partial, message(world, id)).map_err(failed)?;
    std::fs::rename(&partial, path).map_err(failed)
}

fn read_file(path: &std::path::Path, world: usize, timeout: Duration) -> Result<Id> {
    let deadline = Instant::now() + timeout;
    loop {
        match std::fs::read(path) {
            Ok(bytes) => return parse(&bytes, world, &path.display().to_string()),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                return Err(Error::Launch(format!(
                    "rank 0 wrote no NCCL id to {} within {:.0} s ({e}): do all ranks see that file system?",
                    path.display(),
                    timeout.as_secs_f64()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::Launcher;

    fn launch(master: Option<&str>) -> Launch {
        Launch { launcher: Launcher::Torchrun, rank: 0, world: 3, local_rank: 0, master: master.map(String::from) }
    }

    fn vars<'a>(set: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| set.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn the_rendezvous_is_the_id_file_or_the_port_above_master_port() {
        let none: [(&str, &str); 0] = [];
        let tcp = Rendezvous::of(&launch(Some("node1:29500")), vars(&none)).unwrap();
        assert_eq!(tcp, Rendezvous::Tcp { addr: "node1".into(), port: 29501 });
        let chosen = Rendezvous::of(&launch(Some("node1:29500")), vars(&[(RENDEZVOUS_PORT_VAR, "4000")])).unwrap();
        assert_eq!(chosen, Rendezvous::Tcp { addr: "node1".into(), port: 4000 });
        let file = Rendezvous::of(&launch(None), vars(&[(ID_FILE_VAR, "/shared/id")])).unwrap();
        assert_eq!(file, Rendezvous::File("/shared/id".into()));
        let mpirun = Rendezvous::of(&launch(None), vars(&[("MASTER_ADDR", "n0"), ("MASTER_PORT", "7000")])).unwrap();
        assert_eq!(mpirun, Rendezvous::Tcp { addr: "n0".into(), port: 7001 });
        let lost = Rendezvous::of(&launch(None), vars(&none)).unwrap_err().to_string();
        assert!(lost.contains("MASTER_ADDR") && lost.contains(ID_FILE_VAR), "{lost}");
        let top = Rendezvous::of(&launch(Some("n0:65535")), vars(&none)).unwrap_err().to_string();
        assert!(top.contains(RENDEZVOUS_PORT_VAR), "{top}");
    }

    /// Three ranks as threads: rank 0's id reaches both others, over TCP and by file; a
    /// rank of a run of another size is refused; a missing rank 0 is a timeout.
    #[test]
    fn every_rank_gets_rank_0s_id() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("fusellm-rendezvous-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let id: Id = std::array::from_fn(|i| i as u8);
        let wait = Duration::from_secs(20);
        for rendezvous in [Rendezvous::Tcp { addr: "127.0.0.1".into(), port }, Rendezvous::File(dir.join("id"))] {
            let got: Vec<Id> = std::thread::scope(|s| {
                let others: Vec<_> = (1..3)
                    .map(|rank| {
                        s.spawn({
                            let r = &rendezvous;
                            move || r.share(rank, 3, None, wait)
                        })
                    })
                    .collect();
                assert_eq!(rendezvous.share(0, 3, Some(id), wait).unwrap(), id);
                others.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
            });
            assert_eq!(got, vec![id, id]);
            if let Rendezvous::File(path) = &rendezvous {
                let refused = rendezvous.share(1, 4, None, wait).unwrap_err().to_string();
                assert!(refused.contains("runs 3 ranks") && refused.contains("one of 4"), "{refused}");
                rendezvous.done(0);
                assert!(!path.exists());
                let late = rendezvous.share(1, 3, None, Duration::from_millis(200)).unwrap_err().to_string();
                assert!(late.contains("wrote no NCCL id"), "{late}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
