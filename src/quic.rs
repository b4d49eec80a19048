//! Frame I/O on QUIC streams, shared by the rendezvous and peer drivers: a 4-byte
//! length, checked against the caller's cap before the body is allocated. And the
//! peer endpoint's UDP socket.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::wire::{frame_len, HEADER_LEN};

/// Time a peer has to take one frame off our hands.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Receive buffer asked of the kernel for a peer endpoint's socket. Linux counts each
/// datagram at about 2.3 KB (its buffer, not only its 1,452 bytes of payload) and grants
/// twice what is asked, up to twice `net.core.rmem_max`. Where that allows it (4 MiB on
/// the machine PERFORMANCE.md measures) the buffer holds about 1,800 datagrams: two of
/// a session's whole stream windows (1.25 MB each). Linux's stock `rmem_max` (208 KiB)
/// allows about 180 (a process with CAP_NET_ADMIN is given the whole buffer past it),
/// and its default buffer holds about 90: a burst that arrives while both cores are
/// busy overflows it, and every loss halves quinn's congestion window. The memory is
/// taken only while datagrams wait to be read.
pub const PEER_RECV_BUFFER: usize = 2 * 1024 * 1024;

/// A UDP socket for a peer endpoint, bound to `addr`, with a receive buffer of
/// [`PEER_RECV_BUFFER`] or as much of it as the system allows.
pub fn peer_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let options = socket2::SockRef::from(&socket);
    // A smaller buffer costs speed under load, not correctness: go on with it.
    if let Err(e) = options.set_recv_buffer_size(PEER_RECV_BUFFER) {
        tracing::info!(%e, "could not enlarge the peer socket's receive buffer");
    }
    #[cfg(target_os = "linux")]
    if options.recv_buffer_size().is_ok_and(|granted| granted < PEER_RECV_BUFFER) {
        // Past `rmem_max`, which only a process allowed to administer the network
        // (CAP_NET_ADMIN) may do; refused for any other, and nothing changes.
        let _ = force_recv_buffer(&socket, PEER_RECV_BUFFER);
    }
    match options.recv_buffer_size() {
        Ok(granted) if granted < PEER_RECV_BUFFER => tracing::info!(
            granted,
            "the peer socket's receive buffer is smaller than the {PEER_RECV_BUFFER} bytes asked for; fast transfers \
             may lose datagrams (on Linux, raise net.core.rmem_max)"
        ),
        granted => tracing::debug!(?granted, "peer socket receive buffer"),
    }
    Ok(socket)
}

/// Sets the socket's receive buffer with `SO_RCVBUFFORCE`: as `SO_RCVBUF`, but not
/// capped by `net.core.rmem_max`; the kernel refuses it (EPERM) to a process without
/// CAP_NET_ADMIN.
#[cfg(target_os = "linux")]
fn force_recv_buffer(socket: &std::net::UdpSocket, bytes: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).expect("an int's size fits");
    // SAFETY: the descriptor is the open socket `socket` borrows, and the option value
    // points to an int of the length passed, which the call only reads.
    let done =
        unsafe { libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&value as *const libc::c_int).cast(), len) };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A quinn endpoint on a [`peer_socket`], accepting connections when given a server
/// configuration.
pub fn peer_endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, peer_socket(addr)?, runtime)
}

/// Reads one length-prefixed frame of at most `cap` bytes; `None` at a clean end.
pub async fn read_frame(recv: &mut quinn::RecvStream, cap: usize) -> Result<Option<Vec<u8>>, String> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let len = frame_len(header, cap).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    Ok(Some(body))
}

/// Writes one frame, giving up if the other side does not take it in time.
pub async fn write_frame(send: &mut quinn::SendStream, payload: &[u8]) -> Result<(), String> {
    write_frames(send, &[payload]).await
}

/// Writes several frames with one write, giving up if the other side does not take
/// them in time.
pub async fn write_frames(send: &mut quinn::SendStream, payloads: &[&[u8]]) -> Result<(), String> {
    let mut out = Vec::with_capacity(payloads.iter().map(|p| HEADER_LEN + p.len()).sum());
    for payload in payloads {
        let len = u32::try_from(payload.len()).map_err(|_| "a frame over 4 GiB".to_string())?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(payload);
    }
    match tokio::time::timeout(WRITE_TIMEOUT, send.write_chunk(out.into())).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the other side stopped reading".into()),
    }
}

/// Cuts a stream into length-prefixed frames of at most `cap` bytes. A frame that
/// arrives in one piece is handed on without a copy; one that spans pieces is gathered
/// into a buffer sized from its checked length, never more.
pub struct FrameReader {
    cap: usize,
    /// Shortest frame accepted: a flood of tiny frames could otherwise hold far more
    /// memory in frame handles than it took bytes on the wire.
    min: usize,
    partial: bytes::BytesMut,
    /// Time the rest of a frame has once its first byte has arrived.
    frame_timeout: Option<Duration>,
    /// When the frame now being gathered must be complete.
    deadline: Option<tokio::time::Instant>,
}

impl FrameReader {
    pub fn new(cap: usize) -> Self {
        Self { cap, min: 0, partial: bytes::BytesMut::new(), frame_timeout: None, deadline: None }
    }

    /// Refuses frames shorter than `min` bytes (for Noise transport messages, the
    /// 16-byte tag: nothing shorter can be one).
    pub fn with_min_len(mut self, min: usize) -> Self {
        self.min = min;
        self
    }

    /// Once a frame has begun, the rest must arrive within `limit`: a peer that starts
    /// a frame and then trickles it is cut off. Waiting for the next frame to begin is
    /// not limited (an idle stream lives as long as its connection).
    pub fn with_frame_timeout(mut self, limit: Duration) -> Self {
        self.frame_timeout = Some(limit);
        self
    }

    /// Waits for data and appends every frame it completes to `frames` (at least one);
    /// `false` at a clean end of the stream between frames.
    pub async fn read(&mut self, recv: &mut quinn::RecvStream, frames: &mut Vec<bytes::Bytes>) -> Result<bool, String> {
        let before = frames.len();
        while frames.len() == before {
            let next = recv.read_chunk(usize::MAX, true);
            let chunk = match self.deadline {
                Some(deadline) => {
                    tokio::time::timeout_at(deadline, next).await.map_err(|_| "a frame did not arrive in time".to_string())?
                }
                None => next.await,
            };
            match chunk.map_err(|e| e.to_string())? {
                Some(chunk) => self.split(chunk.bytes, frames)?,
                None if self.partial.is_empty() => return Ok(false),
                None => return Err("the stream ended inside a frame".into()),
            }
        }
        Ok(true)
    }

    /// Adds the next piece of the stream; complete frames go to `frames`.
    pub fn split(&mut self, mut piece: bytes::Bytes, frames: &mut Vec<bytes::Bytes>) -> Result<(), String> {
        use bytes::Buf;
        let before = frames.len();
        while !piece.is_empty() {
            if self.partial.is_empty() && piece.len() >= HEADER_LEN {
                let len = self.len_of(&piece)?;
                if piece.len() >= HEADER_LEN + len {
                    frames.push(piece.slice(HEADER_LEN..HEADER_LEN + len));
                    piece.advance(HEADER_LEN + len);
                    continue;
                }
            }
            // Gather the header, then exactly the body it announces.
            if self.partial.len() < HEADER_LEN {
                let take = (HEADER_LEN - self.partial.len()).min(piece.len());
                self.partial.extend_from_slice(&piece[..take]);
                piece.advance(take);
                if self.partial.len() < HEADER_LEN {
                    continue;
                }
                let len = self.len_of(&self.partial)?;
                self.partial.reserve(len);
            }
            let whole = HEADER_LEN + self.len_of(&self.partial)?;
            let take = (whole - self.partial.len()).min(piece.len());
            self.partial.extend_from_slice(&piece[..take]);
            piece.advance(take);
            if self.partial.len() == whole {
                // Handed on unshared (the next frame starts a buffer of its own), so it
                // can be decrypted where it lies.
                frames.push(std::mem::take(&mut self.partial).freeze().slice(HEADER_LEN..));
            }
        }
        // A frame left part-way has its clock running: started now if it began in this
        // piece, or still the one it started with.
        self.deadline = match self.frame_timeout {
            Some(limit) if !self.partial.is_empty() => match self.deadline {
                Some(running) if frames.len() == before => Some(running),
                _ => Some(tokio::time::Instant::now() + limit),
            },
            _ => None,
        };
        Ok(())
    }

    fn len_of(&self, bytes: &[u8]) -> Result<usize, String> {
        let len = frame_len(bytes[..HEADER_LEN].try_into().expect("a whole header"), self.cap).map_err(|e| e.to_string())?;
        if len < self.min {
            return Err(format!("a {len}-byte frame; the shortest is {}", self.min));
        }
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::encode_frame;

    fn stream(bodies: &[&[u8]]) -> Vec<u8> {
        bodies.iter().flat_map(|b| encode_frame(b)).collect()
    }

    #[cfg(target_os = "linux")]
    fn rmem_max() -> usize {
        std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_peer_socket_gets_the_receive_buffer_asked_for_as_far_as_the_system_allows() {
        let socket = peer_socket(([127, 0, 0, 1], 0).into()).unwrap();
        let granted = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        // Linux grants twice what is asked, after capping it at `rmem_max` (a process
        // allowed to force it past the cap gets all of it).
        let capped = 2 * PEER_RECV_BUFFER.min(rmem_max());
        assert!(granted == capped || granted == 2 * PEER_RECV_BUFFER, "granted {granted}, capped at {capped}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn forcing_a_buffer_past_the_cap_takes_the_privilege_or_changes_nothing() {
        let socket = std::net::UdpSocket::bind(("127.0.0.1", 0)).unwrap();
        let options = socket2::SockRef::from(&socket);
        let before = options.recv_buffer_size().unwrap();
        let past_the_cap = rmem_max() + 64 * 1024;
        match force_recv_buffer(&socket, past_the_cap) {
            Ok(()) => assert_eq!(options.recv_buffer_size().unwrap(), 2 * past_the_cap),
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
                assert_eq!(options.recv_buffer_size().unwrap(), before);
            }
        }
    }

    #[test]
    fn frames_come_out_whole_however_the_stream_is_cut() {
        let bodies: Vec<&[u8]> = vec![b"one", b"", b"three", &[7u8; 3000], b"x"];
        let bytes = stream(&bodies);
        for cut in [1, 2, 3, 4, 5, 7, 64, 1200, bytes.len()] {
            let mut reader = FrameReader::new(4096);
            let mut frames = Vec::new();
            for piece in bytes.chunks(cut) {
                reader.split(bytes::Bytes::copy_from_slice(piece), &mut frames).unwrap();
            }
            assert_eq!(frames.iter().map(|f| f.as_ref()).collect::<Vec<_>>(), bodies, "pieces of {cut}");
            assert!(reader.partial.is_empty());
        }
    }

    #[test]
    fn a_frame_over_the_cap_is_refused_before_it_is_gathered() {
        let mut reader = FrameReader::new(100);
        let mut frames = Vec::new();
        let big = encode_frame(&[0u8; 101]);
        assert!(reader.split(bytes::Bytes::copy_from_slice(&big[..2]), &mut frames).is_ok(), "half a header says nothing yet");
        assert!(reader.split(bytes::Bytes::copy_from_slice(&big[2..10]), &mut frames).is_err());
        assert!(reader.partial.capacity() < 100, "nothing was reserved for it");
        let mut fresh = FrameReader::new(100);
        assert!(fresh.split(bytes::Bytes::from(big), &mut frames).is_err());
        assert!(frames.is_empty());
    }

    #[test]
    fn a_frame_begun_has_its_clock_running_until_it_is_whole() {
        let mut reader = FrameReader::new(100).with_frame_timeout(Duration::from_secs(10));
        let mut frames = Vec::new();
        let bytes = stream(&[b"first", b"second"]);
        let (one, two) = (HEADER_LEN + 5, HEADER_LEN + 6);
        reader.split(bytes::Bytes::copy_from_slice(&bytes[..2]), &mut frames).unwrap();
        let started = reader.deadline.expect("half a header starts the clock");
        reader.split(bytes::Bytes::copy_from_slice(&bytes[2..one - 1]), &mut frames).unwrap();
        assert_eq!(reader.deadline, Some(started), "more of the same frame keeps its deadline");
        reader.split(bytes::Bytes::copy_from_slice(&bytes[one - 1..one + 3]), &mut frames).unwrap();
        assert!(reader.deadline.is_some_and(|d| d >= started), "the next frame has begun: its own clock");
        reader.split(bytes::Bytes::copy_from_slice(&bytes[one + 3..one + two]), &mut frames).unwrap();
        assert_eq!(reader.deadline, None, "between frames there is no clock");
        assert_eq!(frames.len(), 2);
        let mut plain = FrameReader::new(100);
        plain.split(bytes::Bytes::copy_from_slice(&bytes[..2]), &mut frames).unwrap();
        assert_eq!(plain.deadline, None, "no limit unless asked for");
    }

    #[test]
    fn frames_shorter_than_the_minimum_are_refused() {
        let mut frames = Vec::new();
        let mut reader = FrameReader::new(100).with_min_len(16);
        assert!(reader.split(bytes::Bytes::from(stream(&[&[1u8; 16]])), &mut frames).is_ok());
        assert!(reader.split(bytes::Bytes::from(stream(&[&[1u8; 15]])), &mut frames).is_err());
        let mut split_header = FrameReader::new(100).with_min_len(16);
        let empty = stream(&[b""]);
        assert!(split_header.split(bytes::Bytes::copy_from_slice(&empty[..2]), &mut frames).is_ok());
        assert!(split_header.split(bytes::Bytes::copy_from_slice(&empty[2..]), &mut frames).is_err());
        assert_eq!(frames.len(), 1, "only the 16-byte frame came through");
    }

    #[test]
    fn a_gathered_frame_is_handed_on_unshared() {
        let bytes = stream(&[&[7u8; 3000], b"x"]);
        let (mut reader, mut frames) = (FrameReader::new(4096), Vec::new());
        for piece in bytes.chunks(1200) {
            reader.split(bytes::Bytes::copy_from_slice(piece), &mut frames).unwrap();
        }
        let gathered = frames.remove(0).try_into_mut().expect("nothing else holds a gathered frame");
        assert_eq!(&gathered[..], &[7u8; 3000]);
        assert_eq!(&frames[0][..], b"x");
    }

    #[test]
    fn a_frame_that_arrives_whole_is_not_copied() {
        let bytes = bytes::Bytes::from(stream(&[b"hello", b"world"]));
        let mut frames = Vec::new();
        FrameReader::new(100).split(bytes.clone(), &mut frames).unwrap();
        assert_eq!(frames[0].as_ptr(), bytes[HEADER_LEN..].as_ptr());
    }
}
