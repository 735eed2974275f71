//! Layer: cluster (imports core, store, net, node).
//!
//! Managing the join tokens a node made (`join` makes them and consumes them): listing them and
//! revoking one. A token is listed by its ID, a prefix of the hash stored of its secret, never
//! the secret: the token itself is shown once, when it is made.

use crate::node::driver::{Revoked, TOKEN_ID_LEN};
use crate::node::{Error as NodeError, Node};

pub use crate::node::driver::{TokenInfo, TokenState};

/// Fewest hex digits of a token ID accepted when revoking (the start of the ID as listed).
pub const TOKEN_ID_MIN: usize = 6;

/// Why tokens could not be listed, or one revoked. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum TokenAdminError {
    /// Not shown back: what was given may be the token itself.
    #[error("not a token ID: a token ID is {TOKEN_ID_MIN} to {TOKEN_ID_LEN} hex digits, as `peerconf token list` shows (the token itself is not its ID)")]
    BadId,
    #[error("no join token with ID {id} on this node: `peerconf token list` shows them (a token is revoked on the node that made it)")]
    NotFound { id: String },
    #[error("token ID {id} is the start of {count} tokens' IDs: give more of its digits")]
    Ambiguous { id: String, count: usize },
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// The join tokens `node` made, oldest first.
pub async fn list_tokens(node: &Node) -> Result<Vec<TokenInfo>, TokenAdminError> {
    Ok(node.tokens().await?)
}

/// Revokes the token of `node` whose ID is (or starts with) `id`: a join with it is refused
/// from then on, naming the revocation. Revoking it again changes nothing.
pub async fn revoke_token(node: &Node, id: &str) -> Result<TokenInfo, TokenAdminError> {
    let id = id.trim();
    if id.len() < TOKEN_ID_MIN
        || id.len() > TOKEN_ID_LEN
        || !id.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(TokenAdminError::BadId);
    }
    let id = id.to_ascii_lowercase();
    match node.revoke_token(&id).await? {
        Revoked::Token(info) => Ok(info),
        Revoked::NotFound => Err(TokenAdminError::NotFound { id }),
        Revoked::Ambiguous(count) => Err(TokenAdminError::Ambiguous { id, count }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::driver::TokenRecord;
    use crate::node::NodeOptions;

    fn opts(seed: u64) -> NodeOptions {
        NodeOptions {
            seed: Some(seed),
            ..NodeOptions::default()
        }
    }

    /// Tokens are listed by ID (never secret nor whole hash), revoked by ID or a unique prefix
    /// of it, and the errors say why without echoing what might be a token.
    #[tokio::test]
    async fn tokens_are_listed_and_revoked_by_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        Node::init(dir.path(), &Default::default(), &opts(1)).expect("init");
        let node = Node::open(dir.path(), opts(2)).expect("open");
        let far = node.clock().wall_ms() + 3_600_000;
        // IDs abababab1111 and abababab2222: their first 8 digits are the same.
        let (h1, h2) = (
            format!("abababab{}", "1".repeat(56)),
            format!("abababab{}", "2".repeat(56)),
        );
        for h in [&h1, &h2] {
            node.put_token(
                h.clone(),
                TokenRecord {
                    expires_wall_ms: far,
                    used: false,
                },
            )
            .await
            .expect("put");
        }
        let listed = list_tokens(&node).await.expect("list");
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].id, &h1[..TOKEN_ID_LEN]);
        assert!(listed.iter().all(|t| t.state == TokenState::Valid));
        let json = serde_json::to_string(&listed).expect("json");
        assert!(!json.contains(&h1) && !json.contains(&h2), "{json}");
        assert!(matches!(
            revoke_token(&node, "abab").await,
            Err(TokenAdminError::BadId)
        ));
        // "ababab" starts both IDs: ambiguous, nothing revoked.
        assert!(matches!(
            revoke_token(&node, "ababab").await,
            Err(TokenAdminError::Ambiguous { count: 2, .. })
        ));
        assert!(list_tokens(&node)
            .await
            .expect("list")
            .iter()
            .all(|t| t.state == TokenState::Valid));
        let secret_like = "f".repeat(64);
        let e = revoke_token(&node, &secret_like).await.unwrap_err();
        assert!(matches!(e, TokenAdminError::BadId));
        assert!(!e.to_string().contains(&secret_like), "{e}");
        assert!(matches!(
            revoke_token(&node, "abcdef").await,
            Err(TokenAdminError::NotFound { .. })
        ));
        let revoked = revoke_token(&node, &h1[..9].to_ascii_uppercase())
            .await
            .expect("revoke by a prefix, any case");
        assert_eq!(revoked.state, TokenState::Revoked);
        assert_eq!(revoked.id, &h1[..TOKEN_ID_LEN]);
        let again = revoke_token(&node, &h1[..TOKEN_ID_LEN])
            .await
            .expect("again");
        assert_eq!(again, revoked, "revoking twice changes nothing");
        let listed = list_tokens(&node).await.expect("list");
        let states: Vec<_> = listed.iter().map(|t| (t.id.as_str(), t.state)).collect();
        assert_eq!(
            states,
            vec![
                (&h1[..TOKEN_ID_LEN], TokenState::Revoked),
                (&h2[..TOKEN_ID_LEN], TokenState::Valid)
            ]
        );
    }
}
