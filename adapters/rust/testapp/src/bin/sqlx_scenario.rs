//! The leak scenario (see `scenario.rs`) on a sqlx pool (poolscope-adapter's
//! `sqlx_pool::InstrumentedPool`) of PostgreSQL or, with `--system mysql`,
//! MySQL/MariaDB, filled to `--max` (`min_connections`) before it starts.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use poolscope_adapter::{
    sqlx_pool::{Backend, InstrumentedPool, PoolConnection},
    Reporter,
};
use sqlx::{MySql, Postgres};

#[path = "../scenario.rs"]
mod scenario;

use scenario::{NoConnection, ScenarioPool};

struct Sqlx<DB: Backend>(InstrumentedPool<DB>);

impl<DB: Backend> Clone for Sqlx<DB> {
    fn clone(&self) -> Self {
        Sqlx(self.0.clone())
    }
}

/// The scenario on `sqlx::$db` (the same code for both: sqlx's executor
/// traits are per database type).
macro_rules! scenario_pool {
    ($db:ty, $address_sql:expr) => {
        impl ScenarioPool for Sqlx<$db> {
            type Conn = PoolConnection<$db>;

            async fn get(&self) -> Result<PoolConnection<$db>, NoConnection> {
                self.0.acquire().await.map_err(|e| match e {
                    sqlx::Error::PoolTimedOut => NoConnection::TimedOut,
                    e => NoConnection::Failed(e.into()),
                })
            }

            async fn execute(conn: &mut PoolConnection<$db>, sql: &str) -> Result<()> {
                sqlx::raw_sql(sql).execute(&mut **conn).await?;
                Ok(())
            }

            async fn text(conn: &mut PoolConnection<$db>, sql: &str) -> Result<String> {
                Ok(sqlx::query_scalar(sql).fetch_one(&mut **conn).await?)
            }

            fn counts(&self) -> (u32, u32) {
                let idle = u32::try_from(self.0.num_idle()).unwrap_or(u32::MAX);
                (self.0.size(), idle)
            }

            fn client_address_sql(&self) -> &'static str {
                $address_sql
            }

            fn reporter(&self) -> &Reporter {
                self.0.reporter()
            }
        }
    };
}

scenario_pool!(
    Postgres,
    "SELECT host(inet_client_addr()) || ':' || inet_client_port()"
);
scenario_pool!(
    MySql,
    "SELECT host FROM information_schema.processlist WHERE id = CONNECTION_ID()"
);

/// The pool for `url`, once sqlx has opened its `min_connections` (in the
/// background): the scenario starts from a full pool, as the bb8 one does.
async fn full_pool<DB: Backend>(
    options: &scenario::Options,
    url: &str,
) -> Result<InstrumentedPool<DB>> {
    let pool = InstrumentedPool::<DB>::builder(&options.pool)
        .max_connections(options.max)
        .min_connections(options.max)
        .acquire_timeout(options.timeout)
        .connect(url)
        .await
        .context("cannot build the pool")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pool.size() < options.max || pool.num_idle() < options.max as usize {
        if tokio::time::Instant::now() >= deadline {
            bail!("sqlx opened {} of {} connections", pool.size(), options.max);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(pool)
}

async fn run(options: scenario::Options) -> Result<()> {
    let port = options.port;
    match options.system.as_str() {
        "postgresql" => {
            let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
            scenario::serve(Sqlx(full_pool::<Postgres>(&options, &url).await?)).await
        }
        "mysql" => {
            let url = format!("mysql://poolscope@127.0.0.1:{port}/poolscope");
            scenario::serve(Sqlx(full_pool::<MySql>(&options, &url).await?)).await
        }
        other => bail!("--system {other}: postgresql or mysql"),
    }
}

fn main() -> Result<()> {
    let options = scenario::parse_args("rust-sqlx")?;
    scenario::run_local(run(options))
}
