from privlora.cli import main

raise SystemExit(main())
