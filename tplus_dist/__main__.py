from tplus_dist.cli import main

raise SystemExit(main())
