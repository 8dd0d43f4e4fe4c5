//! What the daemon tells the settings store about its configuration: one table of the keys
//! that can be clustered (name, how to read and write each in the configuration), the keys
//! that never leave a unit, how a whole configuration is validated, and what applying one
//! means. The store knows nothing else of the configuration.

/// A key that can be clustered, and applies live.
pub struct Key<C> {
    /// Its name, e.g. `smtp.relay_domains`.
    pub name: &'static str,
    /// Its value in a configuration.
    pub get: fn(&C) -> Option<serde_json::Value>,
    /// Sets it in a configuration; fails on a value of the wrong type.
    pub set: fn(&mut C, serde_json::Value) -> Result<(), serde_json::Error>,
}

/// The daemon's side of the settings store.
pub trait Schema: Send + Sync + 'static {
    /// The daemon's configuration.
    type Config: Clone + Send + Sync + 'static;

    /// The clusterable keys.
    fn keys(&self) -> &'static [Key<Self::Config>];

    /// Keys that never leave their unit (identity, addresses, secrets, role): refused by name.
    fn machine_only(&self) -> &'static [&'static str];

    /// Whether a whole configuration is valid (a change that would make it invalid is refused
    /// where it is made, and not applied where it arrives).
    fn validate(&self, config: &Self::Config) -> anyhow::Result<()>;

    /// Puts the effective configuration into effect (at open, and after every change).
    fn apply(&self, config: &Self::Config);

    /// The key named `name`.
    fn key(&self, name: &str) -> Option<&'static Key<Self::Config>> {
        self.keys().iter().find(|k| k.name == name)
    }

    /// The clusterable keys' names, for messages.
    fn key_names(&self) -> String {
        self.keys()
            .iter()
            .map(|k| k.name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A value as `spoolctl config set` gives it: TOML (`["a.example", "b.example"]`, `[]`).
pub fn parse_value(key: &str, text: &str) -> anyhow::Result<serde_json::Value> {
    let doc: toml::Table = toml::from_str(&format!("v = {text}"))
        .map_err(|e| anyhow::anyhow!("key `{key}`: {text:?} is not a TOML value: {e}"))?;
    let v = doc
        .get("v")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("key `{key}`: no value"))?;
    Ok(serde_json::to_value(v)?)
}
