//! The hello exchange: how a shard-aware client learns the shard count, the per-shard
//! ports and the limits. The client sends a [`FrameKind::Hello`](crate::FrameKind::Hello)
//! frame with an empty body; the server answers [`FrameKind::HelloReply`](crate::FrameKind::HelloReply):
//! ```text
//! shard_id             u16   the shard that answered
//! shard_count          u16
//! batch_requests_max   u32
//! frame_bytes_max      u32
//! streams_max          u32   concurrent streams per connection
//! shard_ports          shard_count × u16 (shard i's own UDP port; 0 = none)
//! ```

/// What a client learns from hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    /// The shard that answered.
    pub shard_id: u16,
    /// Number of shards; orders are routed with [`crate::home_shard`] over it.
    pub shard_count: u16,
    /// Most requests per issue frame.
    pub batch_requests_max: u32,
    /// Largest frame.
    pub frame_bytes_max: u32,
    /// Concurrent streams per connection.
    pub streams_max: u32,
    /// Per-shard UDP ports, index = shard id (same host as the service port).
    pub shard_ports: Vec<u16>,
}

/// Why a hello reply was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed hello reply")]
pub struct HelloError;

impl HelloReply {
    /// Encodes the whole reply frame.
    pub fn encode_frame(&self, out: &mut Vec<u8>) {
        let at = crate::frame::begin_frame(out, crate::FrameKind::HelloReply, 0);
        out.extend_from_slice(&self.shard_id.to_le_bytes());
        out.extend_from_slice(&self.shard_count.to_le_bytes());
        out.extend_from_slice(&self.batch_requests_max.to_le_bytes());
        out.extend_from_slice(&self.frame_bytes_max.to_le_bytes());
        out.extend_from_slice(&self.streams_max.to_le_bytes());
        for port in &self.shard_ports {
            out.extend_from_slice(&port.to_le_bytes());
        }
        crate::frame::finish_frame(out, at);
    }

    /// Decodes a reply body.
    pub fn decode(body: &[u8]) -> Result<HelloReply, HelloError> {
        let fixed = body.get(..16).ok_or(HelloError)?;
        let u16_at = |i: usize| u16::from_le_bytes([fixed[i], fixed[i + 1]]);
        let u32_at =
            |i: usize| u32::from_le_bytes([fixed[i], fixed[i + 1], fixed[i + 2], fixed[i + 3]]);
        let shard_id = u16_at(0);
        let shard_count = u16_at(2);
        let ports = &body[16..];
        if shard_count == 0
            || shard_id >= shard_count
            || ports.len() != 2 * usize::from(shard_count)
        {
            return Err(HelloError);
        }
        Ok(HelloReply {
            shard_id,
            shard_count,
            batch_requests_max: u32_at(4),
            frame_bytes_max: u32_at(8),
            streams_max: u32_at(12),
            shard_ports: ports
                .chunks_exact(2)
                .map(|p| u16::from_le_bytes([p[0], p[1]]))
                .collect(),
        })
    }
}

/// Appends a hello frame (empty body).
pub fn encode_hello_frame(out: &mut Vec<u8>) {
    crate::frame::write_frame(out, crate::FrameKind::Hello, 0, &[]);
}
