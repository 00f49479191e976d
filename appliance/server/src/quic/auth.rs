//! Which client identity may issue for which seller taxpayer.
//!
//! A client is identified by the Common Name of its certificate (verified against the
//! configured client CA during the TLS handshake). An identity the table does not know is
//! refused at connection time; a known identity asking for a seller it is not authorised
//! for gets [`appliance_proto::ErrorCode::Unauthorised`] for that request, and the refusal
//! is logged.

use appliance_core::TaxpayerId;
use std::collections::{HashMap, HashSet};

/// The sellers one client may issue for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sellers {
    /// Every seller the appliance serves (`"*"` in the configuration).
    All,
    /// These sellers only.
    Only(HashSet<TaxpayerId>),
}

/// One client's entry as configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientGrant {
    /// Certificate Common Name of the client.
    pub identity: String,
    /// Unified social credit codes of the sellers it may issue for, or `["*"]` for all.
    pub sellers: Vec<String>,
}

/// Why the authorisation table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Two entries for one identity.
    #[error("client {0} is listed twice")]
    Duplicate(String),
    /// A seller that is not a valid unified social credit code.
    #[error("client {identity}: seller {seller}: {message}")]
    Seller {
        /// The client.
        identity: String,
        /// The value.
        seller: String,
        /// Why.
        message: String,
    },
    /// An entry with no sellers.
    #[error("client {0} has no sellers")]
    Empty(String),
}

/// The authorisation table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authorisation {
    clients: HashMap<String, Sellers>,
}

impl Authorisation {
    /// Builds the table from configured entries.
    pub fn new(grants: &[ClientGrant]) -> Result<Authorisation, AuthError> {
        let mut clients = HashMap::new();
        for grant in grants {
            if grant.sellers.is_empty() {
                return Err(AuthError::Empty(grant.identity.clone()));
            }
            let sellers = if grant.sellers.iter().any(|s| s == "*") {
                Sellers::All
            } else {
                let mut set = HashSet::new();
                for seller in &grant.sellers {
                    let id = TaxpayerId::parse(seller).map_err(|e| AuthError::Seller {
                        identity: grant.identity.clone(),
                        seller: seller.clone(),
                        message: e.to_string(),
                    })?;
                    set.insert(id);
                }
                Sellers::Only(set)
            };
            if clients.insert(grant.identity.clone(), sellers).is_some() {
                return Err(AuthError::Duplicate(grant.identity.clone()));
            }
        }
        Ok(Authorisation { clients })
    }

    /// Whether the identity has an entry at all.
    pub fn knows(&self, identity: &str) -> bool {
        self.clients.contains_key(identity)
    }

    /// Whether the identity may issue for the seller.
    pub fn may_issue(&self, identity: &str, seller: &TaxpayerId) -> bool {
        match self.clients.get(identity) {
            Some(Sellers::All) => true,
            Some(Sellers::Only(set)) => set.contains(seller),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seller(n: u32) -> TaxpayerId {
        let first17 = format!("91110000{n:09}");
        TaxpayerId::with_check_char(first17.as_bytes().try_into().unwrap()).unwrap()
    }

    #[test]
    fn grants_are_enforced() {
        let a = Authorisation::new(&[
            ClientGrant {
                identity: "ticketing".into(),
                sellers: vec!["*".into()],
            },
            ClientGrant {
                identity: "catering".into(),
                sellers: vec![seller(1).to_string()],
            },
        ])
        .unwrap();
        assert!(a.may_issue("ticketing", &seller(7)));
        assert!(a.may_issue("catering", &seller(1)));
        assert!(!a.may_issue("catering", &seller(2)));
        assert!(!a.may_issue("hotel", &seller(1)));
        assert!(a.knows("catering") && !a.knows("hotel"));
    }

    #[test]
    fn bad_tables_are_refused() {
        let dup = ClientGrant {
            identity: "x".into(),
            sellers: vec!["*".into()],
        };
        assert_eq!(
            Authorisation::new(&[dup.clone(), dup]),
            Err(AuthError::Duplicate("x".into()))
        );
        assert!(matches!(
            Authorisation::new(&[ClientGrant {
                identity: "y".into(),
                sellers: vec!["911100000000000001".into()],
            }]),
            Err(AuthError::Seller { .. })
        ));
        assert_eq!(
            Authorisation::new(&[ClientGrant {
                identity: "z".into(),
                sellers: vec![],
            }]),
            Err(AuthError::Empty("z".into()))
        );
    }
}
