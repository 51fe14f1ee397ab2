//! What a rank announces at the coordinator's rendezvous, and the checks on the list of every
//! rank's announcement that comes back (by rank).
//!
//! A TCP ring rank announces its listener's `host:port`. An NCCL rank announces `nccl`, and
//! rank 0 adds the communicator's unique id (`nccl:<256 hex digits>`, the 128 bytes NCCL's
//! `ncclGetUniqueId` makes), which every other rank needs to join. Compiled in every build, so
//! a CPU rank recognises a GPU peer (and the reverse) and says what is wrong.

use crate::{Error, Result};

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

const NCCL: &str = "nccl";

/// The opaque id that lets NCCL ranks find each other: made by rank 0, passed to the others.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId(pub [u8; NCCL_ID_BYTES]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId({}…)", &to_hex(&self.0)[..16])
    }
}

/// One rank's rendezvous announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    /// A TCP ring listener's `host:port`.
    Tcp(String),
    /// An NCCL rank; rank 0 carries the communicator's id.
    Nccl(Option<NcclId>),
}

impl Announcement {
    /// The text the rank prints as its rendezvous address.
    pub fn to_text(&self) -> String {
        match self {
            Announcement::Tcp(address) => address.clone(),
            Announcement::Nccl(None) => NCCL.to_string(),
            Announcement::Nccl(Some(id)) => format!("{NCCL}:{}", to_hex(&id.0)),
        }
    }

    /// Reads `rank`'s announcement: `nccl`, `nccl:<id>`, or anything else as a TCP address.
    pub fn parse(rank: usize, text: &str) -> Result<Announcement> {
        let text = text.trim();
        if text == NCCL {
            return Ok(Announcement::Nccl(None));
        }
        let Some(hex) = text.strip_prefix("nccl:") else {
            return Ok(Announcement::Tcp(text.to_string()));
        };
        let id = from_hex(hex).ok_or_else(|| {
            Error::Rendezvous(format!(
                "rank {rank} announced the NCCL id `{}`, which is not {} hex digits: that \
                 rank's loractl is damaged or of another version; run the same CUDA build of \
                 loractl on every worker",
                shorten(text),
                2 * NCCL_ID_BYTES
            ))
        })?;
        Ok(Announcement::Nccl(Some(NcclId(id))))
    }

    fn describe(&self) -> String {
        match self {
            Announcement::Tcp(address) => {
                format!(
                    "joins a TCP ring (a CPU rank, address `{}`)",
                    shorten(address)
                )
            }
            Announcement::Nccl(_) => "uses NCCL (a CUDA build on a GPU)".to_string(),
        }
    }
}

/// Parses every rank's announcement, checking there is one per rank.
fn parse_all(peers: &[String], world: usize) -> Result<Vec<Announcement>> {
    if peers.len() != world {
        return Err(Error::Rendezvous(format!(
            "the rendezvous listed {} ranks for a world of {world}: the worker and the \
             coordinator disagree on the job's size; restart the attempt",
            peers.len()
        )));
    }
    peers
        .iter()
        .enumerate()
        .map(|(rank, text)| Announcement::parse(rank, text))
        .collect()
}

fn mixed(rank: usize, theirs: &Announcement, ours: &Announcement) -> Error {
    Error::Rendezvous(format!(
        "rank {rank} {} while this rank {}: every rank of a job must use the same collective \
         backend, so all ranks of a GPU job need GPUs and a CUDA build of loractl \
         (scripts/cuda/build.sh) as their worker's rank_command, and all ranks of a CPU job \
         none",
        theirs.describe(),
        ours.describe()
    ))
}

/// The TCP ring addresses of every rank, refusing a list in which any rank uses NCCL.
pub fn tcp_addresses(peers: &[String], world: usize) -> Result<Vec<String>> {
    let all = parse_all(peers, world)?;
    let ours = Announcement::Tcp("host:port".into());
    all.into_iter()
        .enumerate()
        .map(|(rank, a)| match a {
            Announcement::Tcp(address) => Ok(address),
            nccl => Err(mixed(rank, &nccl, &ours)),
        })
        .collect()
}

/// Rank 0's NCCL id from every rank's announcement, refusing a list in which any rank joins
/// a TCP ring, rank 0 gave no id, or another rank gave one.
pub fn nccl_id(peers: &[String], world: usize) -> Result<NcclId> {
    let all = parse_all(peers, world)?;
    let ours = Announcement::Nccl(None);
    let mut id = None;
    for (rank, a) in all.into_iter().enumerate() {
        match (rank, a) {
            (_, tcp @ Announcement::Tcp(_)) => return Err(mixed(rank, &tcp, &ours)),
            (0, Announcement::Nccl(Some(i))) => id = Some(i),
            (0, Announcement::Nccl(None)) => {
                return Err(Error::Rendezvous(
                    "rank 0 announced NCCL without the communicator's id: its loractl is of \
                     another version; run the same CUDA build of loractl on every worker"
                        .into(),
                ))
            }
            (r, Announcement::Nccl(Some(_))) => {
                return Err(Error::Rendezvous(format!(
                    "rank {r} announced an NCCL id of its own, but only rank 0 makes one: the \
                     ranks disagree on who is rank 0 (a rank of another attempt?); restart \
                     the attempt"
                )))
            }
            (_, Announcement::Nccl(None)) => {}
        }
    }
    // The loop returned unless rank 0 (world >= 1 after parse_all) had an id.
    id.ok_or_else(|| Error::Rendezvous("the rendezvous list of a world of 0 ranks".into()))
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn from_hex(text: &str) -> Option<[u8; NCCL_ID_BYTES]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * NCCL_ID_BYTES {
        return None;
    }
    let value = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; NCCL_ID_BYTES];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (value(pair[0])? << 4) | value(pair[1])?;
    }
    Some(out)
}

/// A peer's text in an error message, cut short (it came over the network).
fn shorten(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some_id() -> NcclId {
        let mut id = [0u8; NCCL_ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i * 37 + 11) as u8;
        }
        NcclId(id)
    }

    #[test]
    fn an_nccl_id_survives_the_rendezvous_text() -> Result<()> {
        let id = some_id();
        let text = Announcement::Nccl(Some(id)).to_text();
        assert!(text.starts_with("nccl:"));
        assert_eq!(text.len(), 5 + 256);
        assert_eq!(Announcement::parse(0, &text)?, Announcement::Nccl(Some(id)));
        // Upper-case digits, as another implementation might write them, read the same.
        let upper = format!("nccl:{}", text[5..].to_uppercase());
        assert_eq!(
            Announcement::parse(0, &upper)?,
            Announcement::Nccl(Some(id))
        );
        let zero = Announcement::Nccl(Some(NcclId([0; NCCL_ID_BYTES]))).to_text();
        assert_eq!(&zero[5..], "0".repeat(256));

        let peers = vec![text, "nccl".to_string(), "nccl".to_string()];
        assert_eq!(nccl_id(&peers, 3)?, id);
        Ok(())
    }

    #[test]
    fn tcp_addresses_pass_through() -> Result<()> {
        let peers = vec!["10.0.0.1:4000".to_string(), "[::1]:5000".to_string()];
        assert_eq!(tcp_addresses(&peers, 2)?, peers);
        assert_eq!(
            Announcement::parse(1, "10.0.0.1:4000")?.to_text(),
            "10.0.0.1:4000"
        );
        Ok(())
    }

    fn rendezvous_error(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::Rendezvous(m)) => m,
            other => panic!("expected a rendezvous error, got {other:?}"),
        }
    }

    #[test]
    fn a_mix_of_backends_names_the_odd_rank() {
        let id = Announcement::Nccl(Some(some_id())).to_text();
        // A CPU rank among GPU ranks, seen from a GPU rank.
        let peers = vec![id.clone(), "nccl".into(), "10.0.0.3:4000".into()];
        let m = rendezvous_error(nccl_id(&peers, 3));
        assert!(m.contains("rank 2 joins a TCP ring"), "{m}");
        assert!(
            m.contains("10.0.0.3:4000") && m.contains("scripts/cuda/build.sh"),
            "{m}"
        );
        // The same job seen from the CPU rank.
        let m = rendezvous_error(tcp_addresses(&peers, 3));
        assert!(m.contains("rank 0 uses NCCL"), "{m}");
        assert!(m.contains("this rank joins a TCP ring"), "{m}");
        // A GPU rank 1 among CPU ranks.
        let peers = vec!["10.0.0.1:4000".into(), "nccl".into()];
        let m = rendezvous_error(tcp_addresses(&peers, 2));
        assert!(m.contains("rank 1 uses NCCL"), "{m}");
        // Rank 0 on a CPU, rank 1 on a GPU, seen from rank 1.
        let m = rendezvous_error(nccl_id(&peers, 2));
        assert!(m.contains("rank 0 joins a TCP ring"), "{m}");
    }

    #[test]
    fn malformed_ids_and_lists_are_refused_by_rank() {
        let id = Announcement::Nccl(Some(some_id())).to_text();
        for bad in [
            "nccl:".to_string(),
            "nccl:abc".to_string(),
            format!("{}0", id),
            format!("nccl:{}zz", &id[5..259]),
            format!("nccl:{}é", &id[5..260]),
        ] {
            let peers = vec![bad.clone(), "nccl".into()];
            let m = rendezvous_error(nccl_id(&peers, 2));
            assert!(m.contains("rank 0 announced the NCCL id"), "{bad}: {m}");
            assert!(m.contains("256 hex digits"), "{m}");
            assert!(m.len() < 400, "the peer's text is not cut short: {m}");
            // A malformed id is an error on a CPU rank too, not a strange TCP address.
            rendezvous_error(tcp_addresses(&peers, 2));
        }
        let m = rendezvous_error(nccl_id(&["nccl".into(), "nccl".into()], 2));
        assert!(m.contains("rank 0 announced NCCL without"), "{m}");
        let m = rendezvous_error(nccl_id(&[id.clone(), id.clone()], 2));
        assert!(m.contains("rank 1 announced an NCCL id of its own"), "{m}");
        let m = rendezvous_error(nccl_id(&[id], 2));
        assert!(m.contains("listed 1 ranks for a world of 2"), "{m}");
    }
}
