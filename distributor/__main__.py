from distributor.cli import main

raise SystemExit(main())
