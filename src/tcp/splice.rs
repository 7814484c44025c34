//! Forwarding on Linux: bulk goes socket → pipe → socket with `splice(2)`, so
//! its bytes never enter user space; small messages are copied.
//!
//! One pipe per direction. Each round reads what the source socket has, then
//! drains it into the destination completely before the next read. The size
//! of the last read picks how the next one is done. Small reads (a request, a
//! command, a reply) are copied through a buffer on the stack, `recv` then
//! `send`: for them splice costs more than it saves (two calls per message plus
//! one more to find the socket empty, where a short `recv` already tells tokio
//! that it is), ~10% of the CPU per message on a keep-alive loop. A read that
//! fills the buffer switches the direction to splice, and a splice that brings
//! less than a buffer back to copying.
//!
//! The pipe is empty whenever a read starts. That keeps `EAGAIN` unambiguous:
//! when reading, it means "socket empty" (wait readable); when draining the
//! pipe, "destination full" (wait writable). What a copied read cannot hand to
//! the destination at once is written into the empty pipe and drained like
//! spliced bytes. Readiness is re-armed by tokio (`try_io`, and its reads,
//! which also clear it after a short read). Bytes still in a pipe when the
//! destination fails are not retried: the error ends both directions and both
//! sockets close, so the peer sees a reset, not a silent gap.
#![allow(unsafe_code)]

use std::io::{self, PipeWriter, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use super::Tally;
use crate::fds;

/// Bytes moved per `splice` call; the pipe is grown to hold it.
const CHUNK: usize = 256 * 1024;

/// Reads up to this size are copied (nginx's stream proxy buffer is as big).
/// The buffer lives on the stack for one read, so an open connection holds no
/// memory for it; the pipe holds 64 KiB at least, so what the destination does
/// not take fits.
const COPY_MAX: usize = 16 * 1024;

/// Empty pipes kept for the next connection: creating and sizing a pipe
/// pair costs three syscalls and closing it two, per direction per connection.
/// Pooled pipes keep their fds reserved, so the pool is bounded by a share of
/// the fd budget as well as by count.
static IDLE: std::sync::LazyLock<crossbeam_queue::ArrayQueue<Pipe>> =
    std::sync::LazyLock::new(|| crossbeam_queue::ArrayQueue::new(pool_size()));

/// At most 256 pipes (512 fds), and at most 1/16 of the fd budget.
fn pool_size() -> usize {
    (fds::limit() / 32).clamp(1, 256)
}

/// A pipe pair used as the in-kernel buffer of one direction.
pub struct Pipe {
    read: OwnedFd,
    write: PipeWriter,
    /// Its two fds in the data path's budget.
    _fds: fds::Reserved,
}

impl Pipe {
    /// Two pipes (one per direction) from the idle pool or new, or `None`
    /// when the fd budget has no room for them: the caller copies instead.
    pub fn pair() -> Option<(Pipe, Pipe)> {
        Some((Pipe::take()?, Pipe::take()?))
    }

    fn take() -> Option<Pipe> {
        match IDLE.pop() {
            Some(p) => Some(p),
            None => Pipe::new().ok(),
        }
    }

    /// Back to the pool; only called with nothing left in the pipe.
    fn give_back(self) {
        let _ = IDLE.push(self);
    }

    fn new() -> io::Result<Pipe> {
        let reserved = fds::reserve(2).ok_or_else(fds::exhausted)?;
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid, writable array of two ints, as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe means fewer syscalls per megabyte; the default (64 KiB)
        // still works if the limit refuses it.
        // SAFETY: F_SETPIPE_SZ on a pipe fd we own; the argument is a plain int.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        Ok(Pipe {
            read,
            write: PipeWriter::from(write),
            _fds: reserved,
        })
    }
}

/// `splice(from, to, len)` without offsets, non-blocking.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call (borrowed from
    // live owners by the callers); null offsets are valid for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Whether this kernel and these sockets support splice: tried once with a
/// zero-length call, which validates the file types without moving data.
/// `None` when no pipe could be had to try (out of fds): ask again later.
pub fn supported(socket: &TcpStream) -> Option<bool> {
    let pipe = Pipe::new().ok()?;
    // Probed on a fresh pipe, which is then pooled for the first connection.
    let supported = probe(socket, &pipe);
    pipe.give_back();
    Some(supported)
}

fn probe(socket: &TcpStream, pipe: &Pipe) -> bool {
    match splice(socket.as_raw_fd(), pipe.write.as_raw_fd(), 0) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() == Some(libc::EAGAIN),
    }
}

/// The two directions of one session, for the FIN that ends the second.
///
/// The first direction to reach EOF passes it on with `shutdown`, and the
/// other keeps flowing (half-close). The last one need not: the session ends
/// and closes both sockets right after, and `close` sends the FIN itself — not
/// a reset, as each socket's own direction was read to EOF, so neither holds
/// unread bytes. One syscall fewer per connection.
#[derive(Default)]
pub struct Directions(AtomicBool);

impl Directions {
    /// Marks one direction finished; true if the other already was.
    fn last_to_finish(&self) -> bool {
        // Both directions run in one task: the order is all that matters.
        self.0.swap(true, Ordering::Relaxed)
    }
}

/// Moves bytes from `from` to `to` until EOF, then shuts down `to`'s write
/// side (FIN), keeping half-close exactly as the copying path does, unless
/// this is the last direction of `directions` to finish (then the caller's
/// close sends it).
pub async fn pipe(
    mut from: ReadHalf<'_>,
    to: WriteHalf<'_>,
    pipe: Pipe,
    mut moved: Tally<'_>,
    directions: &Directions,
) -> io::Result<u64> {
    let to = to.as_ref();
    // On error or cancellation the pipe may hold bytes: it is dropped (closed),
    // never pooled.
    let mut splicing = false;
    loop {
        let read = if splicing {
            let source = from.as_ref();
            source.readable().await?;
            match source.try_io(Interest::READABLE, || {
                splice(source.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
            }) {
                Ok(0) => None,
                Ok(n) => Some(Read { n, pending: n }),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        } else {
            std::future::poll_fn(|cx| copy(cx, &mut from, to, &pipe)).await?
        };
        let Some(Read { n, mut pending }) = read else {
            // EOF with the pipe drained: it is clean and can serve again.
            pipe.give_back();
            if directions.last_to_finish() {
                return Ok(moved.total);
            }
            match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
                // The peer is already fully gone: nothing left to tell it.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                other => other?,
            }
            return Ok(moved.total);
        };
        splicing = n >= COPY_MAX;
        moved.add(n - pending);
        while pending > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), pending)
            }) {
                Ok(n) => {
                    pending -= n;
                    moved.add(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// One read, and what of it went out: `n` bytes read, `pending` of them in the
/// pipe still to be drained into the destination.
struct Read {
    n: usize,
    pending: usize,
}

/// One copied round: reads into a stack buffer, hands the destination what it
/// takes now and puts the rest into the (empty) pipe. `None` at EOF.
fn copy(
    cx: &mut Context<'_>,
    from: &mut ReadHalf<'_>,
    to: &TcpStream,
    pipe: &Pipe,
) -> Poll<io::Result<Option<Read>>> {
    let mut raw = [MaybeUninit::<u8>::uninit(); COPY_MAX];
    let mut buf = ReadBuf::uninit(&mut raw);
    // tokio's read clears the socket's readiness after a short read (the
    // socket is drained), so the next round waits instead of asking again.
    ready!(Pin::new(from).poll_read(cx, &mut buf))?;
    let data = buf.filled();
    if data.is_empty() {
        return Poll::Ready(Ok(None));
    }
    let sent = match to.try_write(data) {
        Ok(sent) => sent,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Poll::Ready(Err(e)),
    };
    let rest = &data[sent..];
    if !rest.is_empty() {
        // An empty pipe holds 64 KiB at least: a short write cannot happen.
        match (&pipe.write).write(rest) {
            Ok(put) if put == rest.len() => {}
            Ok(_) => return Poll::Ready(Err(io::Error::other("pipe took part of a copied read"))),
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
    Poll::Ready(Ok(Some(Read {
        n: data.len(),
        pending: rest.len(),
    })))
}
