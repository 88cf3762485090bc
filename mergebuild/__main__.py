from mergebuild.cli import main

raise SystemExit(main())
