//! Frame I/O on QUIC streams, shared by the rendezvous and peer drivers: a 4-byte
//! length, checked against the caller's cap before the body is allocated.

use std::time::Duration;

use crate::wire::{encode_frame, frame_len, HEADER_LEN};

/// Time a peer has to take one frame off our hands.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

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
    match tokio::time::timeout(WRITE_TIMEOUT, send.write_all(&encode_frame(payload))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the other side stopped reading".into()),
    }
}
