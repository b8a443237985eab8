//! walcore's store conformance suite (`walcore::store::conformance`), which the library runs
//! against the local file system, run here against S3 on the emulator: create-only writes,
//! absent objects, streamed reads, failed uploads leaving nothing, listings.

use walcore_e2e::moto::{Moto, s3_enabled};

#[test]
fn s3_store_conforms() {
    if !s3_enabled("s3_store_conforms") {
        return;
    }
    let moto = Moto::shared();
    let bucket = moto.create_bucket();
    let options = walcore::store::StoreOptions {
        cloud_options: vec![
            ("aws_endpoint".into(), moto.endpoint()),
            ("aws_allow_http".into(), "true".into()),
            ("aws_access_key_id".into(), "test".into()),
            ("aws_secret_access_key".into(), "test".into()),
            ("aws_region".into(), "us-east-1".into()),
        ],
        ..Default::default()
    };
    let store = walcore::store::Store::from_url(&format!("s3://{bucket}/cluster-a"), &options)
        .expect("S3 store");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(walcore::store::conformance::run(&store, "conformance"))
        .expect("S3 store conforms");
}
