//! The device's end of the completion interrupts (docs/hsm-pcie.md, "Notifications"):
//! one datagram to the Unix socket a driver bound for its queue, named by
//! [`hsm_driver::pcie::notify::irq_socket_name`]. The futex doorbell wake is shared with
//! the driver and stays in `hsm_driver::pcie::notify`.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use hsm_driver::pcie::notify::irq_socket_name;

/// The device's end of the completion interrupts: one unbound, non-blocking datagram
/// socket that sends one byte to a queue's interrupt socket.
#[derive(Debug)]
pub struct IrqSender {
    socket: UnixDatagram,
}

impl IrqSender {
    /// An unbound, non-blocking sender.
    pub fn new() -> io::Result<Self> {
        let socket = UnixDatagram::unbound()?;
        // Never block the firmware or a worker: a full receive queue already holds an
        // interrupt the driver has not read, so this one would add nothing.
        socket.set_nonblocking(true)?;
        Ok(Self { socket })
    }

    /// Signals the driver socket of `token`. Errors (no such socket: the driver is gone
    /// or lives in another network namespace; its queue is full) are returned for the
    /// caller to count, never retried: the driver's own timeout covers a lost signal.
    pub fn signal(&self, token: u64) -> io::Result<()> {
        use std::os::linux::net::SocketAddrExt;
        let name = irq_socket_name(token);
        let addr = SocketAddr::from_abstract_name(&name.as_bytes()[1..])?;
        self.socket.send_to_addr(&[1], &addr).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_sender_reaches_an_abstract_socket() {
        let token = rand::random::<u64>() | 1;
        let name = irq_socket_name(token);
        use std::os::linux::net::SocketAddrExt;
        let addr = SocketAddr::from_abstract_name(&name.as_bytes()[1..]).expect("name");
        let rx = UnixDatagram::bind_addr(&addr).expect("bind");
        let tx = IrqSender::new().expect("sender");
        tx.signal(token).expect("signal");
        let mut b = [0u8; 4];
        assert_eq!(rx.recv(&mut b).expect("recv"), 1);
        // Nobody bound this one: the error is reported, nothing blocks.
        assert!(tx.signal(token ^ 0xFF00).is_err());
    }
}
