//! Why `dvma serve` stopped with an error: [`ServeError`], composed of the
//! configuration's, the TLS setup's ([`TlsError`]), the system's boot
//! ([`BootError`], which carries the drivers' attach errors), blksrv's and
//! the machine's errors, each passed through rather than rewritten.

use std::io;
use std::net::{AddrParseError, SocketAddr};
use std::path::PathBuf;

use kern::bio::BioError;
use kern::blksrv;
use machine::MachineError;

use crate::config::ConfigError;
use crate::system::BootError;

/// Why `dvma serve` failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration did not load.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `--listen` is not an address.
    #[error("--listen {addr}: {source} (expected IP:PORT)")]
    ListenAddr {
        /// What was given.
        addr: String,
        /// Why it does not parse.
        #[source]
        source: AddrParseError,
    },
    /// The TLS options are inconsistent or their files unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A listener off loopback without TLS or `--insecure-listen`.
    #[error(
        "--listen {addr} is not a loopback address, and without TLS anyone who can \
         reach it can read and write every disk; serve TLS (--tls only --tls-cert FILE \
         --tls-key FILE) or pass --insecure-listen to serve it anyway"
    )]
    Exposed {
        /// The address.
        addr: SocketAddr,
    },
    /// The signal handlers could not be installed.
    #[error("signals: {0}")]
    Signals(#[source] io::Error),
    /// The listening socket could not be bound.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The host refused `--tcp-congestion`'s algorithm.
    #[error(
        "--tcp-congestion {name}: {source} (this host allows: {allowed}; `system` keeps the host's default)"
    )]
    TcpCongestion {
        /// The algorithm asked for.
        name: String,
        /// `net.ipv4.tcp_allowed_congestion_control`, or `?`.
        allowed: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The bound socket's address could not be read.
    #[error("listening socket's address: {0}")]
    LocalAddr(#[source] io::Error),
    /// The system did not boot (devices, drivers).
    #[error(transparent)]
    Boot(#[from] BootError),
    /// blksrv did not attach.
    #[error(transparent)]
    Blksrv(#[from] blksrv::AttachError),
    /// A CPU's NIC could not be created.
    #[error("nic: {0}")]
    Nic(#[source] io::Error),
    /// A CPU's `nictx` thread (it sends the replies the CPU held back)
    /// could not be created.
    #[error("nictx on cpu{cpu}: {source}")]
    NicTx {
        /// The CPU.
        cpu: usize,
        /// Why.
        #[source]
        source: kern::sched::SchedError,
    },
    /// A disk cannot be exported as it is.
    #[error("{export}: {source}")]
    Export {
        /// The export (the unit's name).
        export: String,
        /// Why.
        #[source]
        source: nbd::ExportError,
    },
    /// The NIC watchdog thread could not be started.
    #[error("nic watchdog: {0}")]
    Watchdog(#[source] io::Error),
    /// The accepting thread could not be started.
    #[error("accept thread: {0}")]
    Accept(#[source] io::Error),
    /// The flush at shutdown could not run.
    #[error("flush at shutdown: {0}")]
    FlushRun(#[source] MachineError),
    /// Disks failed their flush at shutdown.
    #[error("flush at shutdown: {}", join(failures))]
    Flush {
        /// One per disk that failed.
        failures: Vec<FlushError>,
    },
    /// The machine did not shut down cleanly.
    #[error("shutdown: {0}")]
    Shutdown(#[source] MachineError),
}

fn join(errs: &[FlushError]) -> String {
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A disk's flush at shutdown that failed.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// No buf could be had: the kernel is shutting down.
    #[error("{dev}: interrupted")]
    Interrupted {
        /// The unit.
        dev: String,
    },
    /// The flush failed.
    #[error("{dev}: {source}")]
    Bio {
        /// The unit.
        dev: String,
        /// Its error.
        #[source]
        source: BioError,
    },
}

/// Why the TLS options do not give a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `--tls off` with certificate options.
    #[error("--tls off, but --tls-cert, --tls-key or --tls-ca given")]
    OffWithFiles,
    /// TLS without a certificate or key.
    #[error("TLS needs --tls-cert FILE and --tls-key FILE (PEM)")]
    NeedsCertAndKey,
    /// The certificate file does not read.
    #[error("--tls-cert {}: {source}", path.display())]
    Cert {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("--tls-cert {}: no certificate in it", path.display())]
    NoCert {
        /// The file.
        path: PathBuf,
    },
    /// The key file does not read.
    #[error("--tls-key {}: {source}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls has no protocol version for the provider.
    #[error("TLS: {0}")]
    Protocols(#[source] rustls::Error),
    /// The client CA file does not give a client verifier.
    #[error("--tls-ca {}: {source}", path.display())]
    Ca {
        /// The file.
        path: PathBuf,
        /// Why: reading it (PEM), a certificate rustls refuses, or the
        /// verifier it would make.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The certificate and key do not make a configuration.
    #[error("--tls-cert/--tls-key: {0}")]
    CertKey(#[source] rustls::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_errors_are_joined_per_disk() {
        let e = ServeError::Flush {
            failures: vec![
                FlushError::Interrupted { dev: "sd0".into() },
                FlushError::Bio {
                    dev: "ccd0".into(),
                    source: BioError::Io,
                },
            ],
        };
        assert_eq!(
            e.to_string(),
            format!(
                "flush at shutdown: sd0: interrupted; ccd0: {}",
                BioError::Io
            )
        );
    }

    #[test]
    fn a_boot_error_passes_through_unchanged() {
        let boot = BootError::NoComponent {
            ccd: "ccd0".into(),
            component: "sd9".into(),
        };
        let text = boot.to_string();
        let e = ServeError::from(boot);
        assert_eq!(e.to_string(), text);
        assert!(matches!(
            e,
            ServeError::Boot(BootError::NoComponent { ref ccd, ref component })
                if ccd == "ccd0" && component == "sd9"
        ));
    }
}
