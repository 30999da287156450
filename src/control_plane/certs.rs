//! The certificates and keys a local control plane needs: one CA that signs the
//! servers' serving certificate and the client certificates of its users (and, through
//! the controller-manager, CSRs), and the ServiceAccount token signing key.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate (or, for the ServiceAccount key, the public key) and its private
/// key, PEM encoded.
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The local certificate authority.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Authority {
    pub fn new() -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "keyward local control plane CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's private key: the controller-manager signs approved CSRs with it.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The servers' serving certificate, valid for 127.0.0.1 and localhost.
    pub fn serving(&self) -> Result<Pair, rcgen::Error> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate: Kubernetes reads the user from CN and groups from O.
    pub fn client(&self, user: &str, groups: &[&str]) -> Result<Pair, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        for group in groups {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *group);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<Pair, rcgen::Error> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A fresh ECDSA key pair for signing ServiceAccount tokens.
pub fn service_account_key() -> Result<Pair, rcgen::Error> {
    let key = KeyPair::generate()?;
    Ok(Pair {
        cert_pem: key.public_key_pem(),
        key_pem: key.serialize_pem(),
    })
}
