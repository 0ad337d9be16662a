//! OpenTelemetry instruments built from their declarations in the
//! catalogue (`agent/telemetry-catalogue`), so that a name, unit,
//! description or bucket list is written in one place.

use opentelemetry::metrics::{
    AsyncInstrument, Counter, Histogram, Meter, ObservableCounter, ObservableGauge,
    ObservableUpDownCounter,
};
use telemetry_catalogue::{Instrument, Kind};

fn expect_kind(instrument: &Instrument, kind: Kind) {
    debug_assert_eq!(
        instrument.kind, kind,
        "{} is declared as {:?}",
        instrument.name, instrument.kind
    );
}

pub fn counter(meter: &Meter, i: &'static Instrument) -> Counter<u64> {
    expect_kind(i, Kind::Counter);
    meter
        .u64_counter(i.name)
        .with_description(i.description)
        .with_unit(i.unit)
        .build()
}

pub fn histogram(meter: &Meter, i: &'static Instrument) -> Histogram<f64> {
    expect_kind(i, Kind::Histogram);
    let builder = meter
        .f64_histogram(i.name)
        .with_description(i.description)
        .with_unit(i.unit);
    match i.buckets {
        Some(buckets) => builder.with_boundaries(buckets.to_vec()).build(),
        None => builder.build(),
    }
}

pub fn observable_counter(
    meter: &Meter,
    i: &'static Instrument,
    callback: impl Fn(&dyn AsyncInstrument<u64>) + Send + Sync + 'static,
) -> ObservableCounter<u64> {
    expect_kind(i, Kind::Counter);
    meter
        .u64_observable_counter(i.name)
        .with_description(i.description)
        .with_unit(i.unit)
        .with_callback(callback)
        .build()
}

pub fn observable_f64_counter(
    meter: &Meter,
    i: &'static Instrument,
    callback: impl Fn(&dyn AsyncInstrument<f64>) + Send + Sync + 'static,
) -> ObservableCounter<f64> {
    expect_kind(i, Kind::Counter);
    meter
        .f64_observable_counter(i.name)
        .with_description(i.description)
        .with_unit(i.unit)
        .with_callback(callback)
        .build()
}

pub fn observable_gauge(
    meter: &Meter,
    i: &'static Instrument,
    callback: impl Fn(&dyn AsyncInstrument<u64>) + Send + Sync + 'static,
) -> ObservableGauge<u64> {
    expect_kind(i, Kind::Gauge);
    meter
        .u64_observable_gauge(i.name)
        .with_description(i.description)
        .with_unit(i.unit)
        .with_callback(callback)
        .build()
}

pub fn observable_up_down_counter(
    meter: &Meter,
    i: &'static Instrument,
    callback: impl Fn(&dyn AsyncInstrument<i64>) + Send + Sync + 'static,
) -> ObservableUpDownCounter<i64> {
    expect_kind(i, Kind::UpDownCounter);
    meter
        .i64_observable_up_down_counter(i.name)
        .with_description(i.description)
        .with_unit(i.unit)
        .with_callback(callback)
        .build()
}
