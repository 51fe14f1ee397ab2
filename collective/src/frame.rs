//! The TCP ring's wire format: the handshake that opens a connection and the header in front of
//! every chunk, so that a peer in another job, attempt, call or op is detected, never mixed in.

/// Bumped whenever the wire format changes; a peer with another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;
const HELLO_MAGIC: [u8; 4] = *b"LCTH";
const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"LCTF");
/// A job token longer than this is refused (it is a job id and attempt, not a payload).
pub const MAX_TOKEN: usize = 1024;

/// The operation a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Op {
    AllReduce = 1,
    Broadcast = 2,
    BroadcastDone = 3,
    Barrier = 4,
}

impl Op {
    fn from_u32(v: u32) -> Option<Op> {
        Some(match v {
            1 => Op::AllReduce,
            2 => Op::Broadcast,
            3 => Op::BroadcastDone,
            4 => Op::Barrier,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all-reduce",
            Op::Broadcast => "broadcast",
            Op::BroadcastDone => "broadcast acknowledgement",
            Op::Barrier => "barrier",
        }
    }
}

/// What a rank announces when a connection opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub world_size: u32,
    pub rank: u32,
    pub token: String,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.token.len());
        out.extend_from_slice(&HELLO_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.world_size.to_le_bytes());
        out.extend_from_slice(&self.rank.to_le_bytes());
        out.extend_from_slice(&(self.token.len() as u32).to_le_bytes());
        out.extend_from_slice(self.token.as_bytes());
        out
    }

    /// Reads a hello; `Err` carries why the bytes are not one.
    pub fn read(r: &mut impl std::io::Read) -> std::io::Result<Result<Hello, String>> {
        let mut head = [0u8; 20];
        r.read_exact(&mut head)?;
        if head[..4] != HELLO_MAGIC {
            return Ok(Err(
                "the peer does not speak the loractl ring protocol".into()
            ));
        }
        let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap());
        let len = word(16) as usize;
        if len > MAX_TOKEN {
            return Ok(Err(format!("job token of {len} bytes")));
        }
        let mut token = vec![0u8; len];
        r.read_exact(&mut token)?;
        let Ok(token) = String::from_utf8(token) else {
            return Ok(Err("job token is not UTF-8".into()));
        };
        Ok(Ok(Hello {
            version: word(4),
            world_size: word(8),
            rank: word(12),
            token,
        }))
    }

    /// Why `self` (the peer) cannot join `ours` as rank `expected_rank`, if it cannot.
    pub fn mismatch(&self, ours: &Hello, expected_rank: usize) -> Option<String> {
        if self.version != ours.version {
            return Some(format!(
                "protocol version {} against this rank's {}",
                self.version, ours.version
            ));
        }
        if self.token != ours.token {
            return Some(format!(
                "job token `{}` against this rank's `{}` (another job or attempt)",
                self.token, ours.token
            ));
        }
        if self.world_size != ours.world_size {
            return Some(format!(
                "world size {} against this rank's {}",
                self.world_size, ours.world_size
            ));
        }
        if self.rank as usize != expected_rank {
            return Some(format!(
                "it says it is rank {}, rank {expected_rank} was expected",
                self.rank
            ));
        }
        None
    }
}

/// The reply to a hello: the acceptor's own hello, or why it refuses.
pub fn encode_reply(reply: Result<&Hello, &str>) -> Vec<u8> {
    match reply {
        Ok(hello) => {
            let mut out = vec![0u8];
            out.extend(hello.encode());
            out
        }
        Err(reason) => {
            let reason = &reason.as_bytes()[..reason.len().min(MAX_TOKEN)];
            let mut out = vec![1u8];
            out.extend_from_slice(&(reason.len() as u32).to_le_bytes());
            out.extend_from_slice(reason);
            out
        }
    }
}

pub fn read_reply(r: &mut impl std::io::Read) -> std::io::Result<Result<Hello, String>> {
    let mut status = [0u8; 1];
    r.read_exact(&mut status)?;
    if status[0] == 0 {
        return Hello::read(r);
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = (u32::from_le_bytes(len) as usize).min(MAX_TOKEN);
    let mut reason = vec![0u8; len];
    r.read_exact(&mut reason)?;
    Ok(Err(String::from_utf8_lossy(&reason).into_owned()))
}

/// The header in front of every chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub op: Op,
    /// The call's number on this ring (every rank counts its calls).
    pub seq: u64,
    /// Length of the whole buffer of the call (elements for all-reduce, bytes for broadcast).
    pub total: u64,
    /// The ring step for all-reduce, the root for broadcast.
    pub step: u32,
    /// Index of the chunk within its step.
    pub index: u32,
    /// Payload bytes that follow.
    pub payload: u32,
}

pub const HEADER_LEN: usize = 36;

impl Header {
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
        out.extend_from_slice(&(self.op as u32).to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.total.to_le_bytes());
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&self.payload.to_le_bytes());
    }

    /// Parses a header; `Err` says why the bytes are not one.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, String> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        if u32_at(0) != FRAME_MAGIC {
            return Err("a corrupt frame".into());
        }
        let op = Op::from_u32(u32_at(4)).ok_or_else(|| format!("unknown op {}", u32_at(4)))?;
        Ok(Header {
            op,
            seq: u64_at(8),
            total: u64_at(16),
            step: u32_at(24),
            index: u32_at(28),
            payload: u32_at(32),
        })
    }

    /// The call this header belongs to, in words, for out-of-step errors.
    pub fn describe(&self) -> String {
        let what = match self.op {
            Op::AllReduce => format!("all-reduce of {} floats (step {})", self.total, self.step),
            Op::Broadcast | Op::BroadcastDone => format!(
                "{} of {} bytes from rank {}",
                self.op.name(),
                self.total,
                self.step
            ),
            Op::Barrier => format!("barrier (step {})", self.step),
        };
        format!(
            "call #{} {what}, chunk {}, {} bytes",
            self.seq, self.index, self.payload
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            op: Op::Broadcast,
            seq: 7,
            total: 1 << 40,
            step: 3,
            index: 9,
            payload: 1024,
        };
        let mut out = Vec::new();
        h.write_to(&mut out);
        assert_eq!(out.len(), HEADER_LEN);
        assert_eq!(Header::parse(&out.try_into().unwrap()), Ok(h));
    }

    #[test]
    fn hello_round_trips_and_explains_mismatches() {
        let ours = Hello {
            version: PROTOCOL_VERSION,
            world_size: 4,
            rank: 1,
            token: "j3/2".into(),
        };
        let bytes = ours.encode();
        let back = Hello::read(&mut &bytes[..]).unwrap().unwrap();
        assert_eq!(back, ours);
        assert_eq!(back.mismatch(&ours, 1), None);
        assert!(back.mismatch(&ours, 0).unwrap().contains("rank 1"));
        let other = Hello {
            token: "j3/1".into(),
            ..ours.clone()
        };
        assert!(other.mismatch(&ours, 1).unwrap().contains("j3/1"));
        let reply = encode_reply(Err("no"));
        assert_eq!(read_reply(&mut &reply[..]).unwrap(), Err("no".to_string()));
    }
}
