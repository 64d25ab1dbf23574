//! `report`: throughput over time per table and end-to-end latency of a
//! run, from what weir wrote (each row's `received_at`, the Kafka timestamp,
//! and `ingested_at`, the time of its write transaction) and, when given
//! weir's `/metrics`, from its `weir_end_to_end_seconds` histograms (per
//! row, Kafka append to commit). Writes `report.md` and `report.svg`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use plotters::prelude::*;
use tokio_postgres::Client;

use crate::verify::Run;

#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// The run to report on (the directory `produce --out` wrote).
    #[arg(long, default_value = "target/loadtest/last")]
    pub run: PathBuf,
    #[arg(long, env = "WEIR_POSTGRES__SCHEMA", default_value = "public")]
    pub schema: String,
    /// weir's metrics endpoint, for its commit-time latency histograms.
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Where report.md and report.svg go (default: the run directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Latency percentiles, seconds.
#[derive(Debug, Default, Clone, Copy)]
pub struct Percentiles {
    pub rows: i64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

/// Per table: rows per second over time, and per-second latency p50/p99.
pub struct Series {
    pub table: &'static str,
    /// (second since the run's first write, rows, p50, p99)
    pub points: Vec<(i64, i64, f64, f64)>,
    pub latency: Percentiles,
}

fn scope(run: &Run, table: &str) -> String {
    let (wamid, chat) = run.id_prefixes();
    match table {
        "wa_events" => format!("event_id LIKE '{wamid}'"),
        "messages" => format!("(message_id LIKE '{wamid}' OR message_id LIKE '{chat}')"),
        _ => run.offset_scope("source_topic", "source_partition", "source_offset"),
    }
}

/// Reads per-second throughput and latency of each table for the run.
pub async fn series(client: &Client, schema: &str, run: &Run) -> anyhow::Result<Vec<Series>> {
    let schema = format!("\"{}\"", schema.replace('"', "\"\""));
    let mut out = Vec::new();
    for table in ["wa_events", "messages", "webhook_logs"] {
        let condition = scope(run, table);
        let rows = client
            .query(
                &format!(
                    "SELECT extract(epoch FROM date_trunc('second', ingested_at))::int8 AS s, count(*),
                            percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM ingested_at - received_at)),
                            percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM ingested_at - received_at))
                       FROM {schema}.{table} WHERE {condition} GROUP BY 1 ORDER BY 1"
                ),
                &[],
            )
            .await
            .with_context(|| format!("read {table}"))?;
        let start = rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0);
        let points = rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) - start, r.get(1), r.get(2), r.get(3)))
            .collect();
        let overall = client
            .query_one(
                &format!(
                    "SELECT count(*),
                            COALESCE(percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
                                (ORDER BY extract(epoch FROM ingested_at - received_at)), ARRAY[0, 0, 0]::float8[]),
                            COALESCE(max(extract(epoch FROM ingested_at - received_at))::float8, 0)
                       FROM {schema}.{table} WHERE {condition}"
                ),
                &[],
            )
            .await
            .with_context(|| format!("latency of {table}"))?;
        let quantiles: Vec<f64> = overall.get(1);
        out.push(Series {
            table,
            points,
            latency: Percentiles {
                rows: overall.get(0),
                p50: quantiles[0],
                p95: quantiles[1],
                p99: quantiles[2],
                max: overall.get(2),
            },
        });
    }
    Ok(out)
}

/// The sum of the series of the metric `name` in a /metrics text whose
/// line contains `fragment` (a label such as `kind="reload"`; empty for
/// every series).
pub fn metric_sum(metrics: &str, name: &str, fragment: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter(|line| line.contains(fragment))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, value| sum + value)
}

/// Percentiles of `weir_end_to_end_seconds{from="kafka"}` per table from a
/// Prometheus scrape (linear within buckets, as `histogram_quantile` does).
pub fn metric_percentiles(scrape: &str) -> BTreeMap<String, Percentiles> {
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("weir_end_to_end_seconds_bucket{") else {
            continue;
        };
        if !rest.contains("from=\"kafka\"") {
            continue;
        }
        // Labels are `name="value"` pairs split on commas; match whole
        // names (a plain substring search for `le="` would also hit
        // `table="`).
        let labels = rest.split('}').next().unwrap_or("");
        let label = |name: &str| {
            labels.split(',').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                (key.trim() == name).then(|| value.trim_matches('"').to_string())
            })
        };
        let (Some(table), Some(le)) = (label("table"), label("le")) else {
            continue;
        };
        let upper = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::INFINITY)
        };
        let count: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        buckets.entry(table).or_default().push((upper, count));
    }
    buckets
        .into_iter()
        .map(|(table, mut b)| {
            b.sort_by(|x, y| x.0.total_cmp(&y.0));
            let total = b.last().map(|x| x.1).unwrap_or(0.0);
            let quantile = |q: f64| {
                let rank = q * total;
                let mut previous = (0.0, 0.0);
                for &(upper, count) in &b {
                    if count >= rank {
                        if upper.is_infinite() {
                            return previous.0;
                        }
                        let within = if count > previous.1 {
                            (rank - previous.1) / (count - previous.1)
                        } else {
                            1.0
                        };
                        return previous.0 + (upper - previous.0) * within;
                    }
                    previous = (upper, count);
                }
                previous.0
            };
            // Max: the upper bound of the highest non-empty bucket.
            let mut max = 0.0;
            let mut below = 0.0;
            for &(upper, count) in &b {
                if count > below {
                    max = upper;
                }
                below = count;
            }
            (
                table,
                Percentiles {
                    rows: total as i64,
                    p50: quantile(0.5),
                    p95: quantile(0.95),
                    p99: quantile(0.99),
                    max,
                },
            )
        })
        .collect()
}

/// Draws rows/s per table and latency p50/p99 over time.
pub fn chart(path: &std::path::Path, series: &[Series], title: &str) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1100, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(380);
    let seconds = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .max()
        .unwrap_or(1)
        .max(1);
    let peak = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .max()
        .unwrap_or(1)
        .max(1);
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
    ];
    {
        let mut chart = ChartBuilder::on(&top)
            .caption(
                format!("{title}: rows written per second"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(70)
            .build_cartesian_2d(0i64..seconds + 1, 0i64..(peak as f64 * 1.1) as i64)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("rows/s")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (s, color) in series.iter().zip(colors) {
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().map(|p| (p.0, p.1)),
                    color.stroke_width(2),
                ))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(s.table)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    {
        let worst = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.3))
            .fold(0.001f64, f64::max)
            * 1000.0;
        let mut chart = ChartBuilder::on(&bottom)
            .caption(
                "latency, Kafka timestamp to write (ms): p50 solid, p99 dashed",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(70)
            .build_cartesian_2d(0i64..seconds + 1, 0f64..worst * 1.1)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("ms")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (s, color) in series.iter().zip(colors) {
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().map(|p| (p.0, p.2 * 1000.0)),
                    color.stroke_width(2),
                ))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .draw_series(DashedLineSeries::new(
                    s.points.iter().map(|p| (p.0, p.3 * 1000.0)),
                    6,
                    4,
                    color.stroke_width(1),
                ))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn ms(seconds: f64) -> String {
    format!("{:.0} ms", seconds * 1000.0)
}

/// Writes the report; returns its text.
pub async fn report(client: &Client, args: &ReportArgs) -> anyhow::Result<String> {
    let run = Run::load(&args.run)?;
    let out = args.out.clone().unwrap_or_else(|| args.run.clone());
    std::fs::create_dir_all(&out)?;
    let series = series(client, &args.schema, &run).await?;
    let svg = out.join("report.svg");
    chart(&svg, &series, &format!("seed {}", run.manifest.shape.seed))?;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# Load test report\n\nRun: seed {}, {} events sent at {:.0}/s (target {}), {} to {}.\n",
        run.manifest.shape.seed,
        run.manifest.count,
        run.manifest.achieved_rate,
        if run.manifest.rate == 0 {
            "as fast as possible".to_string()
        } else {
            format!("{}/s", run.manifest.rate)
        },
        run.manifest.started_at,
        run.manifest.finished_at
    );
    let _ = writeln!(
        text,
        "## Throughput\n\n| table | rows | seconds with writes | mean rows/s | peak rows/s |\n| --- | ---: | ---: | ---: | ---: |"
    );
    for s in &series {
        let seconds = s.points.len().max(1);
        let peak = s.points.iter().map(|p| p.1).max().unwrap_or(0);
        let _ = writeln!(
            text,
            "| {} | {} | {} | {:.0} | {} |",
            s.table,
            s.latency.rows,
            s.points.len(),
            s.latency.rows as f64 / seconds as f64,
            peak
        );
    }
    let _ = writeln!(
        text,
        "\n## End-to-end latency\n\nFrom the rows (Kafka timestamp to the write transaction, exact per row):\n\n| table | rows | p50 | p95 | p99 | max |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    );
    for s in &series {
        let l = s.latency;
        let _ = writeln!(
            text,
            "| {} | {} | {} | {} | {} | {} |",
            s.table,
            l.rows,
            ms(l.p50),
            ms(l.p95),
            ms(l.p99),
            ms(l.max)
        );
    }
    if let Some(url) = &args.metrics_url {
        let scrape = fetch(url).await.with_context(|| format!("scrape {url}"))?;
        let metrics = metric_percentiles(&scrape);
        let _ = writeln!(
            text,
            "\nFrom weir's `weir_end_to_end_seconds{{from=\"kafka\"}}` (Kafka append to commit, per row; \
             interpolated within buckets, max is a bucket bound; counts every row this weir process wrote):\n\n\
             | table | rows | p50 | p95 | p99 | max |\n| --- | ---: | ---: | ---: | ---: | ---: |"
        );
        for (table, l) in &metrics {
            let _ = writeln!(
                text,
                "| {table} | {} | {} | {} | {} | <= {} |",
                l.rows,
                ms(l.p50),
                ms(l.p95),
                ms(l.p99),
                ms(l.max)
            );
        }
    }
    let _ = writeln!(text, "\nChart: {}", svg.display());
    std::fs::write(out.join("report.md"), &text)?;
    Ok(text)
}

/// GET over plain HTTP (weir's metrics endpoint).
pub async fn fetch(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "{}",
        head.lines().next().unwrap_or_default()
    );
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_interpolate_within_buckets() {
        let scrape = r#"
weir_end_to_end_seconds_bucket{table="wa_events",from="kafka",le="0.1"} 50
weir_end_to_end_seconds_bucket{table="wa_events",from="kafka",le="0.2"} 90
weir_end_to_end_seconds_bucket{table="wa_events",from="kafka",le="0.5"} 100
weir_end_to_end_seconds_bucket{table="wa_events",from="kafka",le="+Inf"} 100
weir_end_to_end_seconds_bucket{table="wa_events",from="event",le="0.1"} 7
"#;
        let p = metric_percentiles(scrape)["wa_events"];
        assert_eq!(p.rows, 100);
        assert!((p.p50 - 0.1).abs() < 1e-9);
        assert!((p.p95 - 0.35).abs() < 1e-9, "{}", p.p95);
        assert_eq!(p.max, 0.5);
    }
}
