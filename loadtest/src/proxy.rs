//! A TCP fault proxy for the chaos runner: it sits between weir and a
//! server (the broker, or PostgreSQL) and can pass traffic through, delay
//! it, stall it, or go down.
//!
//! - `Pass`: bytes are forwarded as they come.
//! - `Delay(d)`: every chunk is forwarded `d` after it was read, in order,
//!   in both directions (a round trip costs `2d` more; throughput is not
//!   capped, as on a long link).
//! - `Stall`: nothing is forwarded; what is read waits (up to a bounded
//!   queue, then TCP pushes back) until the mode changes. Connections stay
//!   open, as on a link that silently drops packets.
//! - `Down`: every open connection is closed and the listening socket is
//!   closed too, so new connections are refused: what clients see when
//!   the server process is gone. `up` listens again on the same port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Delay(Duration),
    Stall,
    Down,
}

pub struct FaultProxy {
    listen: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `listen` and forwards each connection to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<FaultProxy> {
        let (mode, _) = watch::channel(Mode::Pass);
        let mode = Arc::new(mode);
        // Bind once here, so a taken port is an error of `start`.
        let first = TcpListener::bind(listen)
            .await
            .with_context(|| format!("fault proxy: listen on {listen}"))?;
        let task = tokio::spawn(serve(first, listen, upstream, mode.clone()));
        Ok(FaultProxy { listen, mode, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.mode.send_replace(Mode::Down);
        self.task.abort();
    }
}

async fn serve(
    first: TcpListener,
    listen: SocketAddr,
    upstream: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
) {
    let mut modes = mode.subscribe();
    let mut listener = Some(first);
    loop {
        match listener.take() {
            Some(open) => {
                tokio::select! {
                    accepted = open.accept() => {
                        if let Ok((client, _)) = accepted {
                            tokio::spawn(connection(client, upstream, mode.subscribe()));
                        }
                        listener = Some(open);
                    }
                    changed = modes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        // Down: drop the listening socket (new connections
                        // are refused); open connections close themselves.
                        if *modes.borrow_and_update() != Mode::Down {
                            listener = Some(open);
                        }
                    }
                }
            }
            None => {
                if modes.changed().await.is_err() {
                    return;
                }
                if *modes.borrow_and_update() != Mode::Down {
                    // The port was ours a moment ago: retry briefly while
                    // the kernel lets go of it.
                    for _ in 0..100 {
                        if let Ok(open) = TcpListener::bind(listen).await {
                            listener = Some(open);
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
    }
}

async fn connection(client: TcpStream, upstream: SocketAddr, mut modes: watch::Receiver<Mode>) {
    if *modes.borrow_and_update() == Mode::Down {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, modes.clone());
    let down = pump(server_read, client_write, modes.clone());
    let down_mode = async {
        loop {
            if modes.changed().await.is_err() || *modes.borrow_and_update() == Mode::Down {
                return;
            }
        }
    };
    // Whichever ends first ends the connection: both sockets are dropped.
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = down_mode => {}
    }
}

/// Forwards one direction: a reader queues chunks stamped with when they
/// may go; the writer sends each when its time comes and the link is not
/// stalled.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    modes: watch::Receiver<Mode>,
) {
    let (queue, mut queued) = mpsc::channel::<(Instant, Vec<u8>)>(256);
    let reader_modes = modes.clone();
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due = match *reader_modes.borrow() {
                        Mode::Delay(delay) => Instant::now() + delay,
                        _ => Instant::now(),
                    };
                    if queue.send((due, buffer[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let mut writer_modes = modes;
    let writer = async move {
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            loop {
                let mode = *writer_modes.borrow_and_update();
                match mode {
                    Mode::Stall => {
                        if writer_modes.changed().await.is_err() {
                            return;
                        }
                    }
                    Mode::Down => return,
                    Mode::Pass | Mode::Delay(_) => break,
                }
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    loop {
                        match socket.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if socket.write_all(&buffer[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream) -> std::io::Result<Duration> {
        let started = Instant::now();
        stream.write_all(b"ping").await?;
        let mut answer = [0u8; 4];
        stream.read_exact(&mut answer).await?;
        assert_eq!(&answer, b"ping");
        Ok(started.elapsed())
    }

    #[tokio::test]
    async fn passes_delays_stalls_and_goes_down() {
        let upstream = echo_server().await;
        let port = crate::bench::free_port().unwrap();
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let proxy = FaultProxy::start(listen, upstream).await.unwrap();
        let mut stream = TcpStream::connect(listen).await.unwrap();
        let fast = round_trip(&mut stream).await.unwrap();
        assert!(fast < Duration::from_millis(100), "{fast:?}");

        proxy.set(Mode::Delay(Duration::from_millis(100)));
        let slow = round_trip(&mut stream).await.unwrap();
        assert!(slow >= Duration::from_millis(200), "{slow:?}");

        proxy.set(Mode::Stall);
        let stalled =
            tokio::time::timeout(Duration::from_millis(300), round_trip(&mut stream)).await;
        assert!(stalled.is_err(), "a stalled link answered");
        proxy.set(Mode::Pass);
        // The stalled ping arrives once the link is back.
        let mut answer = [0u8; 4];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"ping");

        proxy.set(Mode::Down);
        let mut buffer = [0u8; 4];
        let closed = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer))
            .await
            .expect("the open connection is closed");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            TcpStream::connect(listen).await.is_err(),
            "new connections are refused"
        );

        proxy.set(Mode::Pass);
        let mut again = None;
        for _ in 0..50 {
            if let Ok(stream) = TcpStream::connect(listen).await {
                again = Some(stream);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut again = again.expect("the proxy listens again");
        round_trip(&mut again).await.unwrap();
        assert_eq!(proxy.mode(), Mode::Pass);
    }
}
