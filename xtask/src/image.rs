//! Images for the benchmarks: variants of the demo image that share no layer, for cold pulls.

use berth_tests::Cluster;

/// Builds `n` variants of the demo image (each with a layer of its own) and pushes them to the
/// cluster's registry as `demo/httpd-cold:0..n`; returns their references.
pub fn push_cold_variants(cluster: &Cluster, n: usize) -> anyhow::Result<Vec<String>> {
    let dir = tempfile::tempdir()?;
    let layout = dir.path().join("layout");
    // The run's prefix goes into each layer, so no earlier bench run's cache can serve them either.
    let salt = &cluster.state().prefix;
    let mut refs = Vec::with_capacity(n);
    for i in 0..n {
        let tag = i.to_string();
        berth_tests::image::build_image(&layout, &tag, Some(&format!("{salt}-{i}\n")))?;
        let reference = format!("{}/demo/httpd-cold:{tag}", cluster.registry());
        berth_tests::image::push(&layout, &tag, &reference)?;
        refs.push(reference);
    }
    Ok(refs)
}
