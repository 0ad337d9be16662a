//! The leak scenario (see `scenario.rs`) on a bb8 pool
//! (poolscope-adapter's `bb8_pg::InstrumentedPool`), filled to `--max`
//! (`min_idle`) before it starts.

use anyhow::{Context, Result};
use poolscope_adapter::{
    bb8_pg::{Client, InstrumentedPool, RunError},
    Reporter,
};

#[path = "../scenario.rs"]
mod scenario;

use scenario::{NoConnection, ScenarioPool};

#[derive(Clone)]
struct Bb8(InstrumentedPool);

impl ScenarioPool for Bb8 {
    type Conn = Client<'static>;

    async fn get(&self) -> Result<Client<'static>, NoConnection> {
        self.0.get_owned().await.map_err(|e| match e {
            RunError::TimedOut => NoConnection::TimedOut,
            RunError::User(e) => NoConnection::Failed(e.into()),
        })
    }

    async fn execute(conn: &mut Client<'static>, sql: &str) -> Result<()> {
        Ok(conn.batch_execute(sql).await?)
    }

    async fn text(conn: &mut Client<'static>, sql: &str) -> Result<String> {
        Ok(conn.query_one(sql, &[]).await?.try_get(0)?)
    }

    fn counts(&self) -> (u32, u32) {
        let state = self.0.state();
        (state.connections, state.idle_connections)
    }

    fn reporter(&self) -> &Reporter {
        self.0.reporter()
    }
}

async fn run(options: scenario::Options) -> Result<()> {
    let mut pg = tokio_postgres::Config::new();
    pg.host("127.0.0.1")
        .port(options.port)
        .user("postgres")
        .dbname("postgres")
        .application_name("poolscope-bb8-scenario");
    let pool = InstrumentedPool::builder(&options.pool, pg, tokio_postgres::NoTls)
        .max_size(options.max)
        .min_idle(Some(options.max))
        .connection_timeout(options.timeout)
        .build()
        .await
        .context("cannot build the pool")?;
    scenario::serve(Bb8(pool)).await
}

fn main() -> Result<()> {
    let options = scenario::parse_args("rust-bb8")?;
    scenario::run_local(run(options))
}
