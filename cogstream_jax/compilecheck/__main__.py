from cogstream_jax.compilecheck.cli import main

raise SystemExit(main())
