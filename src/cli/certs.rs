//! `bicsi certs`: the cluster CA and the split mode's certificates, and their revocation.

use std::path::PathBuf;

use clap::Args;

use crate::error::Result;

#[derive(Args, Debug, Clone)]
pub struct CertsArgs {
    /// Where to write: OUT/ca (the CA: made once, reused after), OUT/controller, OUT/node.
    #[arg(long)]
    pub out: PathBuf,
    /// How many days the controller's and nodes' certificates are valid.
    #[arg(long, default_value_t = 365)]
    pub days: u64,
    /// More DNS names for the controller's certificate (repeatable); it always has
    /// bicsi-controller, the name node agents check.
    #[arg(long)]
    pub controller_name: Vec<String>,
    /// Revoke this certificate (a PEM file; repeatable) instead of making certificates: writes
    /// ca.crl into OUT/ca, OUT/controller and OUT/node.
    #[arg(long)]
    pub revoke: Vec<PathBuf>,
}

/// `bicsi certs`.
pub(super) fn run(args: CertsArgs) -> Result<()> {
    if !args.revoke.is_empty() {
        let serials = crate::certs::revoke(&args.out, &args.revoke)?;
        for s in serials {
            crate::outln!("revoked serial {s}");
        }
        crate::outln!(
            "wrote {}/{{ca,controller,node}}/ca.crl and {}; apply the Secrets and restart the processes",
            args.out.display(),
            args.out.join(crate::certs::SECRETS_FILE).display()
        );
        return Ok(());
    }
    let made = crate::certs::make(&args.out, args.days, &args.controller_name)?;
    crate::outln!(
        "{} CA: {}",
        if made.ca_created { "new" } else { "kept the" },
        made.ca_dir.display()
    );
    crate::outln!(
        "controller: {}  (bicsi controller --tls-dir)",
        made.controller_dir.display()
    );
    crate::outln!(
        "node agents: {}  (bicsi node --tls-dir)",
        made.node_dir.display()
    );
    crate::outln!(
        "Secrets bicsi-controller-tls and bicsi-node-tls: {} (copy to deploy/tls.yaml)",
        args.out.join(crate::certs::SECRETS_FILE).display()
    );
    Ok(())
}
